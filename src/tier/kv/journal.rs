//! The offline journal: last-write-wins changes accepted while NATS was unreachable.
//!
//! A change is appended and fsync'ed before the program's `close()` returns, so it survives
//! `kill -9` of the daemon; it is replayed in order when the connection comes back, with its
//! original message id, so a replay whose acknowledgement was lost is de-duplicated by
//! JetStream.
//!
//! # Records
//!
//! Each record is a 40-byte header and its body:
//!
//! ```text
//! "SJR2" | salt u64 | seq u64 | meta len u32 | value len u32 | meta CRC | value CRC | header CRC
//! meta (JSON: bucket, key, op, msg_id) | value
//! ```
//!
//! (little-endian; the CRCs are CRC-32, the header's over its first 36 bytes). The header CRC
//! makes the lengths trustworthy before they are used, so one damaged record is skipped by
//! looking for the next magic whose header checks, and every intact record after it is kept.
//! `seq` numbers the records of the file from 0 (a file starts over at 0 when it empties or
//! is rewritten), so the gap between two intact records says exactly how many were lost
//! between them, even when their bytes are gone. `salt` is chosen when a file starts and is
//! the same in all its records: a record that a damaged record's *value* happens to contain
//! (a journal stored as a KV value) has another salt and is never mistaken for a write.
//! The meta CRC is separate so that a record whose value is damaged still names its key.
//!
//! Journals of the first format (`SJR1`: magic, meta length, meta, value length, value,
//! CRC-32 of meta and value; no sequence) are read the same way and rewritten in this one.
//!
//! # Damage
//!
//! A record cut at the end of the file whose header is intact (or a header cut short) is the
//! append a crash interrupted: its `close()` never returned, nothing acknowledged is lost, and
//! it is dropped with a warning. Anything else that does not check is damage: the damaged
//! bytes are kept in `kv.log.damaged-<time>` next to the journal, what was lost (how many
//! writes, the keys that can still be read) is logged as an error and written to
//! `kv.log.lost-<time>.json`, which `status` shows until the operator removes it, and the
//! journal is rewritten with the intact records. Records already replayed before a crash stay
//! in the file until it empties, so the count may include writes that did reach NATS.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::status::JournalDamage;

const MAGIC: &[u8; 4] = b"SJR2";
const MAGIC_V1: &[u8; 4] = b"SJR1";
const HEADER: usize = 40;
/// Reports of damage found, next to the journal: `<journal name>` + this + time + `.json`.
const REPORT_INFIX: &str = ".lost-";
/// Copies of damaged journals: `<journal name>` + this + time.
const COPY_INFIX: &str = ".damaged-";

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
    /// The salt of this file's records.
    salt: u64,
    /// The sequence of the next record appended to the file.
    next_seq: u64,
}

fn crc(parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

fn new_salt() -> u64 {
    // Random enough to tell two files apart; std seeds RandomState from the OS.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

fn frame(record: &Record, salt: u64, seq: u64) -> Vec<u8> {
    let meta = serde_json::to_vec(record).expect("records serialize");
    let mut out = Vec::with_capacity(HEADER + meta.len() + record.value.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&salt.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&(record.value.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc(&[&meta]).to_le_bytes());
    out.extend_from_slice(&crc(&[&record.value]).to_le_bytes());
    let header_crc = crc(&[&out[..36]]);
    out.extend_from_slice(&header_crc.to_le_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(&record.value);
    out
}

/// One intact record found in a file.
#[derive(Debug)]
struct Found {
    end: usize,
    /// `None` for the first format.
    salt_seq: Option<(u64, u64)>,
    record: Record,
}

/// What the bytes at one offset are.
#[derive(Debug)]
enum Probe {
    Intact(Found),
    /// An intact header whose record runs past the end of the file.
    Cut {
        seq: u64,
    },
    /// An intact header and meta, a damaged value: the key is known.
    Named {
        seq: u64,
        salt: u64,
        record: Record,
    },
    /// Anything else.
    Bad,
}

fn u32_at(d: &[u8], i: usize) -> Option<usize> {
    d.get(i..i.checked_add(4)?)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize)
}

fn u64_at(d: &[u8], i: usize) -> Option<u64> {
    d.get(i..i.checked_add(8)?)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
}

fn probe(data: &[u8], at: usize) -> Probe {
    match data.get(at..at + 4) {
        Some(m) if m == MAGIC => probe_v2(data, at),
        Some(m) if m == MAGIC_V1 => probe_v1(data, at),
        _ => Probe::Bad,
    }
}

fn probe_v2(data: &[u8], at: usize) -> Probe {
    let Some(header) = data.get(at..at + HEADER) else {
        return Probe::Bad;
    };
    if crc(&[&header[..36]]) as usize != u32_at(header, 36).unwrap_or(0) {
        return Probe::Bad;
    }
    let (salt, seq) = (u64_at(header, 4).unwrap_or(0), u64_at(header, 12).unwrap_or(0));
    let (meta_len, value_len) = (u32_at(header, 20).unwrap_or(0), u32_at(header, 24).unwrap_or(0));
    let (meta_crc, value_crc) = (u32_at(header, 28).unwrap_or(0), u32_at(header, 32).unwrap_or(0));
    let meta_at = at + HEADER;
    let value_at = meta_at + meta_len;
    let end = value_at + value_len;
    let record = data
        .get(meta_at..value_at)
        .filter(|meta| crc(&[meta]) as usize == meta_crc)
        .and_then(|meta| serde_json::from_slice::<Record>(meta).ok());
    if end > data.len() {
        return Probe::Cut { seq };
    }
    let Some(mut record) = record else { return Probe::Bad };
    let value = &data[value_at..end];
    if crc(&[value]) as usize != value_crc {
        return Probe::Named { seq, salt, record };
    }
    record.value = value.to_vec();
    Probe::Intact(Found {
        end,
        salt_seq: Some((salt, seq)),
        record,
    })
}

fn probe_v1(data: &[u8], at: usize) -> Probe {
    let parsed = (|| {
        let meta_len = u32_at(data, at + 4)?;
        let meta_at = at + 8;
        let meta = data.get(meta_at..meta_at.checked_add(meta_len)?)?;
        let value_len = u32_at(data, meta_at + meta_len)?;
        let value_at = meta_at + meta_len + 4;
        let value = data.get(value_at..value_at.checked_add(value_len)?)?;
        let stored = u32_at(data, value_at + value_len)?;
        if crc(&[meta, value]) as usize != stored {
            return None;
        }
        let mut record = serde_json::from_slice::<Record>(meta).ok()?;
        record.value = value.to_vec();
        Some(Found {
            end: value_at + value_len + 4,
            salt_seq: None,
            record,
        })
    })();
    parsed.map_or(Probe::Bad, Probe::Intact)
}

/// The next offset after `at` where a record of either format may start.
fn next_magic(data: &[u8], at: usize) -> usize {
    (at + 1..data.len().saturating_sub(3))
        .find(|&i| &data[i..i + 4] == MAGIC || &data[i..i + 4] == MAGIC_V1)
        .unwrap_or(data.len())
}

/// What reading a journal's bytes found.
#[derive(Debug, Default, PartialEq)]
struct Parsed {
    records: Vec<Record>,
    /// The salt and the last sequence of the intact records of the current format.
    salt: Option<u64>,
    last_seq: Option<u64>,
    /// Whether any record is of the first format (the file is rewritten).
    old_format: bool,
    /// Bytes of a torn last append, dropped.
    torn: usize,
    /// Damaged bytes.
    damaged: usize,
    /// Acknowledged writes lost (a lower bound when `at_least`).
    lost: u64,
    at_least: bool,
    /// The lost records whose meta could still be read.
    named: Vec<Record>,
}

/// Reads every intact record of `data`, skipping damaged ones (see the module docs).
fn parse(data: &[u8]) -> Parsed {
    // The file's salt is the one most intact records carry: a record found inside a damaged
    // record's value may carry another.
    let salt = {
        let mut votes = BTreeMap::<u64, usize>::new();
        let mut at = 0;
        while at < data.len() {
            match probe(data, at) {
                Probe::Intact(f) => {
                    if let Some((salt, _)) = f.salt_seq {
                        *votes.entry(salt).or_default() += 1;
                    }
                    at = f.end;
                }
                _ => at = next_magic(data, at),
            }
        }
        votes.into_iter().max_by_key(|(_, n)| *n).map(|(s, _)| s)
    };
    let mut out = Parsed {
        salt,
        ..Parsed::default()
    };
    // Damaged regions: start, end, and the sequences of the headers inside that check.
    let mut region: Option<(usize, Vec<u64>)> = None;
    let mut at = 0;
    let close = |out: &mut Parsed, region: &mut Option<(usize, Vec<u64>)>, end: usize, next: Option<u64>| {
        let Some((start, seqs)) = region.take() else { return };
        out.damaged += end - start;
        let after = out.last_seq.map_or(0, |s| s + 1);
        match next {
            // Sequences number the file's records: the gap is what was lost.
            Some(next) => out.lost += next.saturating_sub(after),
            None => {
                let seen = seqs
                    .iter()
                    .filter(|&&s| s >= after)
                    .map(|&s| s - after + 1)
                    .max()
                    .unwrap_or(0);
                out.lost += seen.max(1);
                out.at_least = true;
            }
        }
    };
    while at < data.len() {
        let p = probe(data, at);
        let p = match p {
            Probe::Intact(f)
                if f.salt_seq
                    .is_some_and(|(s, q)| Some(s) != salt || out.last_seq.is_some_and(|l| q <= l)) =>
            {
                Probe::Bad
            }
            p => p,
        };
        match p {
            Probe::Intact(f) => {
                match f.salt_seq {
                    Some((_, seq)) => {
                        close(&mut out, &mut region, at, Some(seq));
                        out.last_seq = Some(seq);
                    }
                    None => {
                        // The first format has no sequence: a damaged region lost at least one.
                        close(&mut out, &mut region, at, None);
                        out.old_format = true;
                    }
                }
                out.records.push(f.record);
                at = f.end;
            }
            p => {
                let (_, seqs) = region.get_or_insert_with(|| (at, Vec::new()));
                match p {
                    // Possibly the torn last append: decided below.
                    Probe::Cut { seq } => seqs.push(seq),
                    Probe::Named { seq, salt: s, record } if Some(s) == salt || salt.is_none() => {
                        seqs.push(seq);
                        out.named.push(record);
                    }
                    _ => {}
                }
                at = next_magic(data, at);
            }
        }
    }
    if let Some((start, _)) = &region {
        let tail = &data[*start..];
        let expected = out.last_seq.map_or(0, |s| s + 1);
        let cut_header = tail.len() < HEADER && (MAGIC.starts_with(tail) || tail.starts_with(MAGIC));
        // The next record, cut short: what a crash in the middle of an append leaves (bytes
        // inside it that look like a record are its value's). A file cut at the end looks the
        // same, so such a cut goes unreported (see docs/SEMANTICS.md).
        let torn = cut_header || matches!(probe(data, *start), Probe::Cut { seq } if seq == expected);
        if torn {
            out.torn = tail.len();
            region = None;
        }
    }
    close(&mut out, &mut region, data.len(), None);
    out
}

impl Journal {
    /// Opens (creating) the journal at `path`. A torn last append is dropped; damage is kept
    /// in a copy, reported (log and `status`), and the journal rewritten with what is intact.
    pub fn open(path: &Path) -> std::io::Result<Journal> {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)?;
        let mut data = Vec::new();
        file.read_to_end(&mut data)?;
        let parsed = parse(&data);
        let mut journal = Journal {
            path: path.to_path_buf(),
            file,
            records: parsed.records.clone().into(),
            salt: parsed.salt.unwrap_or_else(new_salt),
            next_seq: parsed.last_seq.map_or(0, |s| s + 1),
        };
        if parsed.damaged > 0 {
            report(path, &data, &parsed)?;
            journal.compact()?;
        } else if parsed.old_format {
            tracing::info!(path = %path.display(), records = parsed.records.len(), "rewriting the journal in the checksummed record format");
            journal.compact()?;
        } else if parsed.torn > 0 {
            tracing::warn!(
                path = %path.display(),
                dropped = parsed.torn,
                "dropping a torn record at the end of the journal (its close() never returned)"
            );
            let valid = data.len() - parsed.torn;
            journal.file.set_len(valid as u64)?;
            journal.file.sync_all()?;
        }
        journal.file.seek(SeekFrom::End(0))?;
        Ok(journal)
    }

    /// Appends a record and syncs it to disk before returning.
    pub fn append(&mut self, record: Record) -> std::io::Result<()> {
        self.file.write_all(&frame(&record, self.salt, self.next_seq))?;
        self.file.sync_data()?;
        self.next_seq += 1;
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
            self.salt = new_salt();
            self.next_seq = 0;
        }
        Ok(())
    }

    /// Rewrites the file with only the records not yet replayed (after a partial replay),
    /// numbered from 0 under a new salt.
    pub fn compact(&mut self) -> std::io::Result<()> {
        let tmp = self.path.with_extension("compact");
        let salt = new_salt();
        let mut out = File::create(&tmp)?;
        for (seq, record) in self.records.iter().enumerate() {
            out.write_all(&frame(record, salt, seq as u64))?;
        }
        out.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        self.file = OpenOptions::new().read(true).write(true).open(&self.path)?;
        self.file.seek(SeekFrom::End(0))?;
        self.salt = salt;
        self.next_seq = self.records.len() as u64;
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

    /// The journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a record for this bucket and key waits (its file must not be swept away).
    pub fn has(&self, bucket: &str, key: &str) -> bool {
        self.records.iter().any(|r| r.bucket == bucket && r.key == key)
    }
}

fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// The name of a lost record for people: its key, and the path it encodes.
fn describe(record: &Record) -> String {
    match super::key::decode(&record.key) {
        Some(super::key::Decoded::File(path)) => {
            format!("{} ({}, bucket {})", record.key, path.display(), record.bucket)
        }
        _ => format!("{} (bucket {})", record.key, record.bucket),
    }
}

/// Keeps a copy of a damaged journal, writes the report `status` shows, and logs the loss.
fn report(path: &Path, data: &[u8], parsed: &Parsed) -> std::io::Result<()> {
    let found_at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let stamp: String = found_at.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut suffix = stamp.clone();
    for n in 2.. {
        if !dir.join(format!("{name}{COPY_INFIX}{suffix}")).exists() {
            break;
        }
        suffix = format!("{stamp}-{n}");
    }
    let copy = dir.join(format!("{name}{COPY_INFIX}{suffix}"));
    let report_file = dir.join(format!("{name}{REPORT_INFIX}{suffix}.json"));
    let mut out = File::create(&copy)?;
    out.write_all(data)?;
    out.sync_all()?;
    let keys: Vec<String> = parsed.named.iter().map(describe).collect();
    let damage = JournalDamage {
        found_at,
        journal: path.display().to_string(),
        copy: copy.display().to_string(),
        report: report_file.display().to_string(),
        lost: parsed.lost,
        at_least: parsed.at_least,
        keys: keys.clone(),
        damaged_bytes: parsed.damaged as u64,
        kept: parsed.records.len() as u64,
    };
    let tmp = report_file.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&damage)?)?;
    std::fs::rename(&tmp, &report_file)?;
    File::open(dir)?.sync_all()?;
    let n = parsed.lost;
    let unnamed = n.saturating_sub(keys.len() as u64);
    tracing::error!(
        journal = %path.display(),
        copy = %copy.display(),
        report = %report_file.display(),
        damaged_bytes = parsed.damaged,
        kept = parsed.records.len(),
        "the offline journal is damaged: {}{n} acknowledged write{} lost ({}{}); the intact records are replayed, \
         the damaged journal is kept in the copy, and `status` shows this until the report is removed",
        if parsed.at_least { "at least " } else { "" },
        plural(n),
        if keys.is_empty() { "no key readable".to_string() } else { format!("keys: {}", keys.join(", ")) },
        if unnamed > 0 && !keys.is_empty() { format!("; {unnamed} more whose key is unreadable") } else { String::new() },
    );
    Ok(())
}

/// The damage reports kept next to the journal at `path`, oldest first (see the module docs).
pub fn damage_reports(path: &Path) -> Vec<JournalDamage> {
    let Some(dir) = path.parent() else { return Vec::new() };
    let prefix = format!(
        "{}{REPORT_INFIX}",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut reports: Vec<(String, JournalDamage)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with(&prefix) || !name.ends_with(".json") {
                return None;
            }
            let mut damage: JournalDamage = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
            damage.report = e.path().display().to_string();
            Some((name, damage))
        })
        .collect();
    reports.sort_by(|a, b| a.0.cmp(&b.0));
    reports.into_iter().map(|(_, d)| d).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec(key: &str, value: &[u8]) -> Record {
        Record {
            bucket: "b".into(),
            key: key.into(),
            op: JournalOp::Put,
            msg_id: format!("id-{key}"),
            value: value.to_vec(),
        }
    }

    /// A journal of `n` records as `Journal::append` writes them, and where each one is. The
    /// values differ, so that no cut splices two records into one that checks.
    fn file(n: usize, value_len: usize) -> (Vec<u8>, Vec<(usize, usize)>) {
        let mut data = Vec::new();
        let mut at = Vec::new();
        for i in 0..n {
            let start = data.len();
            let value: Vec<u8> = (0..value_len + i).map(|j| (i * 31 + j) as u8).collect();
            data.extend(frame(&rec(&format!("k{i:02}"), &value), 7, i as u64));
            at.push((start, data.len()));
        }
        (data, at)
    }

    fn keys(p: &Parsed) -> Vec<String> {
        p.records.iter().map(|r| r.key.clone()).collect()
    }

    fn all_but(n: usize, lost: &[usize]) -> Vec<String> {
        (0..n)
            .filter(|i| !lost.contains(i))
            .map(|i| format!("k{i:02}"))
            .collect()
    }

    #[test]
    fn records_survive_reopening_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut j = Journal::open(&path).unwrap();
        j.append(rec("a", b"1")).unwrap();
        j.append(rec("b", b"")).unwrap();
        j.append(Record {
            op: JournalOp::Delete,
            ..rec("a", b"")
        })
        .unwrap();
        drop(j);
        let mut j = Journal::open(&path).unwrap();
        assert_eq!(j.len(), 3);
        assert_eq!(j.front().unwrap().value, b"1");
        assert!(j.has("b", "b"));
        j.pop_front().unwrap();
        j.compact().unwrap();
        j.append(rec("c", b"after compaction")).unwrap();
        drop(j);
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.len(), 3);
        assert_eq!(j.front().unwrap().key, "b");
        assert!(damage_reports(&path).is_empty());
    }

    #[test]
    fn a_torn_tail_is_dropped_without_a_report() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut j = Journal::open(&path).unwrap();
        j.append(rec("a", b"kept")).unwrap();
        j.append(rec("b", b"torn")).unwrap();
        drop(j);
        let len = std::fs::metadata(&path).unwrap().len();
        for cut in [3, 40, len - frame(&rec("a", b"kept"), 0, 0).len() as u64 - 2] {
            OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(len - cut)
                .unwrap();
            let j = Journal::open(&path).unwrap();
            assert_eq!(j.len(), 1, "cut {cut}");
            drop(j);
            let mut j = Journal::open(&path).unwrap();
            j.append(rec("b", b"torn")).unwrap();
        }
        // Appends after the repair land after the valid prefix.
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.len(), 2);
        assert!(damage_reports(&path).is_empty());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no copy of a torn journal"
        );
    }

    #[test]
    fn a_flipped_bit_loses_only_its_record_and_names_it() {
        let (data, at) = file(30, 400);
        let mut bad = data.clone();
        bad[(at[9].0 + at[9].1) / 2] ^= 0x08;
        let p = parse(&bad);
        assert_eq!(keys(&p), all_but(30, &[9]));
        assert_eq!((p.lost, p.at_least, p.torn), (1, false, 0));
        assert_eq!(p.named.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(), ["k09"]);
        assert_eq!(parse(&data).records.len(), 30);
        assert_eq!(parse(&data).damaged, 0);
    }

    #[test]
    fn a_cut_in_the_middle_is_counted_by_sequence() {
        let (data, at) = file(30, 400);
        let (from, to) = ((at[12].0 + at[12].1) / 2, (at[14].0 + at[14].1) / 2);
        let p = parse(&[&data[..from], &data[to..]].concat());
        assert_eq!(keys(&p), all_but(30, &[12, 13, 14]));
        assert_eq!((p.lost, p.at_least), (3, false));
    }

    #[test]
    fn a_flipped_first_byte_and_a_zeroed_page() {
        let (data, at) = file(30, 400);
        let mut bad = data.clone();
        bad[0] ^= 0xff;
        let p = parse(&bad);
        assert_eq!(keys(&p), all_but(30, &[0]));
        assert_eq!(p.lost, 1);

        let mut bad = data.clone();
        bad[4096..8192].fill(0);
        let hit: Vec<usize> = (0..30).filter(|&i| at[i].0 < 8192 && at[i].1 > 4096).collect();
        let p = parse(&bad);
        assert_eq!(keys(&p), all_but(30, &hit));
        assert_eq!(p.lost, hit.len() as u64);
    }

    #[test]
    fn damage_at_the_end_is_a_lower_bound() {
        let (data, at) = file(10, 50);
        let mut bad = data.clone();
        bad[at[9].0 + 5] ^= 1;
        let p = parse(&bad);
        assert_eq!(keys(&p), all_but(10, &[9]));
        assert_eq!((p.lost, p.at_least, p.torn), (1, true, 0));
        // Two damaged headers at the end: the count is a lower bound.
        bad[at[8].0 + 5] ^= 1;
        let p = parse(&bad);
        assert_eq!(keys(&p), all_but(10, &[8, 9]));
        assert!(p.at_least && p.lost >= 1, "{p:?}");
        assert_eq!(p.torn, 0);
    }

    #[test]
    fn a_record_inside_a_damaged_value_is_not_a_write() {
        // A value that holds a whole record of another journal (another salt).
        let inner = frame(&rec("planted", b"x"), 99, 1);
        let mut data = Vec::new();
        data.extend(frame(&rec("k00", b"a"), 7, 0));
        let start = data.len();
        data.extend(frame(&rec("k01", &inner), 7, 1));
        data.extend(frame(&rec("k02", b"c"), 7, 2));
        data[start + 12] ^= 1; // the header of k01
        let p = parse(&data);
        assert_eq!(keys(&p), ["k00", "k02"]);
        assert_eq!(p.lost, 1);
    }

    #[test]
    fn first_format_journals_are_read_and_rewritten() {
        fn frame_v1(record: &Record) -> Vec<u8> {
            let meta = serde_json::to_vec(record).unwrap();
            let mut out = MAGIC_V1.to_vec();
            out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
            out.extend_from_slice(&meta);
            out.extend_from_slice(&(record.value.len() as u32).to_le_bytes());
            out.extend_from_slice(&record.value);
            out.extend_from_slice(&crc(&[&meta, &record.value]).to_le_bytes());
            out
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut data: Vec<u8> = ["a", "b", "c"].iter().flat_map(|k| frame_v1(&rec(k, b"old"))).collect();
        std::fs::write(&path, &data).unwrap();
        let mut j = Journal::open(&path).unwrap();
        assert_eq!(j.len(), 3);
        j.append(rec("d", b"new")).unwrap();
        drop(j);
        assert_eq!(
            &std::fs::read(&path).unwrap()[..4],
            MAGIC,
            "rewritten in the new format"
        );
        assert_eq!(Journal::open(&path).unwrap().len(), 4);
        // A damaged first-format record: the others are kept, the loss is at least one.
        let len = frame_v1(&rec("a", b"old")).len();
        data[len + 10] ^= 0x40;
        let p = parse(&data);
        assert_eq!(keys(&p), ["a", "c"]);
        assert!(p.at_least && p.lost == 1);
    }

    #[test]
    fn damage_is_copied_reported_and_the_journal_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.log");
        let (mut data, at) = file(5, 10);
        data[at[2].1 - 1] ^= 0x10;
        std::fs::write(&path, &data).unwrap();
        let mut j = Journal::open(&path).unwrap();
        assert_eq!(j.len(), 4);
        let reports = damage_reports(&path);
        assert_eq!(reports.len(), 1);
        assert_eq!((reports[0].lost, reports[0].kept), (1, 4));
        assert!(reports[0].keys[0].starts_with("k02"), "{:?}", reports[0].keys);
        assert_eq!(std::fs::read(&reports[0].copy).unwrap(), data);
        // Appends go on after the rewritten records, and the next open is clean.
        j.append(rec("k05", b"new")).unwrap();
        drop(j);
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.len(), 5);
        assert_eq!(
            damage_reports(&path).len(),
            1,
            "the report stays until the operator removes it"
        );
        std::fs::remove_file(&reports[0].report).unwrap();
        assert!(damage_reports(&path).is_empty());
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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any damage to a byte range keeps every record outside it and counts exactly the
        /// ones it touched (a lower bound when the damage reaches the last record).
        #[test]
        fn damage_loses_only_the_records_it_touches(
            n in 1usize..12,
            value_len in 0usize..300,
            from in 0.0f64..1.0,
            len in 1usize..700,
            how in 0u8..3,
        ) {
            let (data, at) = file(n, value_len);
            let from = (from * data.len() as f64) as usize;
            let to = (from + len).min(data.len());
            let bad = match how {
                0 => { let mut b = data.clone(); b[from..to].fill(0); b }
                1 => { let mut b = data.clone(); b[from..to].iter_mut().for_each(|x| *x ^= 0x5a); b }
                _ => [&data[..from], &data[to..]].concat(),
            };
            // A record is touched when its bytes changed where it was (records after a cut move
            // but keep their bytes; a record that starts in the cut is gone).
            let touched: Vec<usize> = (0..n)
                .filter(|&i| {
                    let (start, end) = at[i];
                    let moved = how == 2 && start >= to;
                    let gone = how == 2 && start >= from && start < to;
                    gone || (!moved && bad.get(start..end) != Some(&data[start..end]))
                })
                .collect();
            let p = parse(&bad);
            prop_assert_eq!(keys(&p), all_but(n, &touched));
            let reaches_end = touched.last() == Some(&(n - 1));
            if touched.is_empty() {
                prop_assert_eq!(p.lost, 0);
            } else if how == 2 && reaches_end {
                // A cut into the last record shortens the file: it looks like a torn append,
                // or (a cut at a record boundary) like no damage at all.
                prop_assert!(p.torn > 0 || p.lost >= 1 || to == data.len(), "{:?}", p);
            } else if reaches_end {
                // A cut or damage at the end: a torn append (nothing acknowledged) when only
                // the last record's tail is gone, else at least one write lost.
                prop_assert!(p.torn > 0 || (p.at_least && p.lost >= 1), "{:?}", p);
                prop_assert!(p.lost <= touched.len() as u64 || p.at_least);
            } else {
                prop_assert_eq!(p.lost, touched.len() as u64);
                prop_assert!(!p.at_least);
            }
        }
    }
}
