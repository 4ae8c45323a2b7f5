//! A history checker: drivers record what every node did, then these checks decide whether
//! the history is one the semantics allow.
//!
//! **Model.** A history is a list of operations ([`Op`]), each with the node and thread that
//! issued it, the key (a path, or `doc#field` for merge checks), its kind, the instants it was
//! invoked and returned, the bytes it wrote or read, and its result (ok or errno). A key's
//! value is either *absent* or some bytes. Writes, exclusive creates, deletes (a write of
//! "absent") and appends change it; reads observe it. A read that failed with `ENOENT` observed
//! "absent"; a read that failed otherwise observed nothing.
//!
//! A write-like operation is *acknowledged* when it returned ok, *refused* when its errno says
//! it had no effect (`EEXIST` for a create, `ENOENT` for a delete, `ESTALE`/`EPERM` for a
//! write or append), and *in doubt* otherwise: it may or may not have taken effect, at any
//! time after its invocation.
//!
//! **Invariants checked**, each by one function returning every violation with the ops
//! involved (times relative to the recorder's start, bytes escaped):
//!
//! - [`check_reads_written`] (a): a read returns the initial value, "absent", or the value
//!   of a write on that key invoked before the read returned. Torn reads (new data cut at the
//!   old length, old data past the new length, NUL padding) fail here, and are explained.
//! - [`check_no_stale_reads`] (b): a read invoked at least `settle` after a write W returned
//!   returns W or a write not superseded: its source write must not have returned before the
//!   invocation of an acknowledged write W'' with `W''.ret + settle <= read.invoke`.
//! - [`check_linearizable`] (c): per key, a Wing-Gong search (with memoization and greedy
//!   placement of operations that do not change the state) for a linearization against a
//!   register (absent | held(v)): `create_excl` (ok | `EEXIST`), write, delete, read. Reads
//!   from other nodes' caches are only close-to-open, so their invocation is moved `read_slack`
//!   earlier (bounded staleness; zero is strict linearizability). Creates stay strict.
//! - [`check_lww_converged`] (d): every node ends with the same value and revision per key,
//!   one value per revision, and the value is one some write produced.
//! - [`check_appends`] (e): every node's file is the same bytes; every acknowledged append
//!   appears exactly once, contiguous; appends ordered in real time (one returned before the
//!   other was invoked) are in that order; no bytes nobody appended; every read was a prefix
//!   of the final file (files only grow, in one order).
//! - [`check_fields`] (f): every node's final map holds every field at its last acknowledged
//!   value (or a later in-doubt one), no field nobody wrote, and all nodes agree.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What an operation did; the checks give each kind its register meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// open + read to the end + close; `value` is what was read.
    Read,
    /// Replace the whole value (open with truncation, write, close; or rename over).
    Write,
    /// Exclusive create (`O_EXCL`, noclobber): ok for exactly one creator, else `EEXIST`.
    Create,
    /// unlink: the value becomes absent.
    Delete,
    /// Append `value` to the end of the file.
    Append,
}

/// One recorded operation.
#[derive(Debug, Clone)]
pub struct Op {
    /// Position in the recording (stable names in reports).
    pub id: usize,
    /// The node (mount) it ran on.
    pub node: String,
    /// The process or thread that issued it: ops of one process are sequential.
    pub process: String,
    /// The path, or `doc#field` for field writes.
    pub key: String,
    /// What it did.
    pub kind: Kind,
    /// When the call started.
    pub invoke: Instant,
    /// When it returned.
    pub ret: Instant,
    /// Bytes written (write, create, append) or read (read); `None`: absent / nothing.
    pub value: Option<Vec<u8>>,
    /// Ok, or the errno (`-1`: failed, errno unknown, e.g. a shell's exit status).
    pub result: Result<(), i32>,
}

/// How far a write-like operation is known to have taken effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    /// Returned ok: it took effect before it returned.
    Acked,
    /// Its errno says it changed nothing.
    Refused,
    /// Failed otherwise (timeout, EIO, a shell's exit status): it may have landed, late.
    InDoubt,
}

impl Op {
    /// Whether it changes the key (the checks treat every other kind as an observation).
    fn is_write(&self) -> bool {
        matches!(self.kind, Kind::Write | Kind::Create | Kind::Delete | Kind::Append)
    }

    /// Which writes may have landed: the checks must not blame a read on a refused write.
    fn effect(&self) -> Effect {
        match (self.kind, self.result) {
            (_, Ok(())) => Effect::Acked,
            (Kind::Create, Err(libc::EEXIST)) | (Kind::Delete, Err(libc::ENOENT)) => Effect::Refused,
            (Kind::Write | Kind::Append, Err(libc::ESTALE | libc::EPERM)) => Effect::Refused,
            _ => Effect::InDoubt,
        }
    }

    /// What a read observed: `Some(None)` absent, `Some(Some(bytes))`, `None` nothing.
    fn observed(&self) -> Option<Option<&[u8]>> {
        match (self.kind, self.result) {
            (Kind::Read, Ok(())) => Some(Some(self.value.as_deref().unwrap_or_default())),
            (Kind::Read, Err(libc::ENOENT)) => Some(None),
            _ => None,
        }
    }

    /// The value this write leaves (deletes leave "absent").
    fn written(&self) -> Option<&[u8]> {
        match self.kind {
            Kind::Delete => None,
            _ => Some(self.value.as_deref().unwrap_or_default()),
        }
    }
}

/// Shared by every driver thread; the lock is held only to push one op.
pub struct Recorder {
    /// Report times are relative to it.
    t0: Instant,
    /// Every op, in the order they were recorded.
    ops: Mutex<Vec<Op>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

/// The calling thread's name for [`Op::process`]: threads are the sequential processes.
fn this_process() -> String {
    let t = std::thread::current();
    match t.name() {
        Some(n) => format!("{}/{n}", std::process::id()),
        None => format!("{}/{:?}", std::process::id(), t.id()),
    }
}

impl Recorder {
    /// Times in reports are relative to this moment.
    pub fn new() -> Recorder {
        Recorder {
            t0: Instant::now(),
            ops: Mutex::new(Vec::new()),
        }
    }

    /// Records an op timed by the caller (a child process, a two-step idiom); returns its id.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        node: &str,
        process: &str,
        key: &str,
        kind: Kind,
        invoke: Instant,
        ret: Instant,
        value: Option<Vec<u8>>,
        result: Result<(), i32>,
    ) -> usize {
        let mut ops = self.ops.lock().unwrap();
        let id = ops.len();
        ops.push(Op {
            id,
            node: node.into(),
            process: process.into(),
            key: key.into(),
            kind,
            invoke,
            ret,
            value,
            result,
        });
        id
    }

    /// Times `f` and records it as issued by this thread. For reads `f` returns the bytes;
    /// for writes `written` names the bytes and `f` returns `None`.
    pub fn run(
        &self,
        node: &str,
        key: &str,
        kind: Kind,
        written: Option<&[u8]>,
        f: impl FnOnce() -> std::io::Result<Option<Vec<u8>>>,
    ) -> Result<Option<Vec<u8>>, i32> {
        let invoke = Instant::now();
        let out = f();
        let ret = Instant::now();
        let (value, result) = match &out {
            Ok(read) => (read.clone().or_else(|| written.map(<[u8]>::to_vec)), Ok(())),
            Err(e) => (written.map(<[u8]>::to_vec), Err(e.raw_os_error().unwrap_or(-1))),
        };
        self.record(node, &this_process(), key, kind, invoke, ret, value, result);
        out.map_err(|e| e.raw_os_error().unwrap_or(-1))
    }

    /// A read of `path`, recorded under `key`.
    pub fn read(&self, node: &str, key: &str, path: &std::path::Path) -> Result<Option<Vec<u8>>, i32> {
        self.run(node, key, Kind::Read, None, || std::fs::read(path).map(Some))
    }

    /// A whole-file write of `path` (open with O_TRUNC, write, close), recorded under `key`.
    pub fn write(&self, node: &str, key: &str, path: &std::path::Path, bytes: &[u8]) -> Result<(), i32> {
        self.run(node, key, Kind::Write, Some(bytes), || std::fs::write(path, bytes).map(|_| None))
            .map(|_| ())
    }

    /// Everything recorded so far, in invocation order.
    pub fn history(&self) -> History {
        let mut ops = self.ops.lock().unwrap().clone();
        ops.sort_by_key(|o| (o.invoke, o.id));
        History { t0: self.t0, ops }
    }
}

/// A finished recording, what the checks take.
#[derive(Debug, Clone)]
pub struct History {
    /// Times in reports are relative to this.
    pub t0: Instant,
    /// In invocation order.
    pub ops: Vec<Op>,
}

/// One broken invariant, with what is needed to debug it.
#[derive(Debug, Clone)]
pub struct Violation {
    /// Which check (a..f) found it.
    pub check: &'static str,
    /// The key (path, or doc#field).
    pub key: String,
    /// The ops and values involved.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}: {}", self.check, self.key, self.detail)
    }
}

/// The first `limit` violations, one block each, and how many there were per check: what a
/// failing driver prints.
pub fn report(violations: &[Violation], limit: usize) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for v in violations {
        *counts.entry(v.check).or_default() += 1;
    }
    let mut out = format!("{} violations {:?}\n", violations.len(), counts);
    // Examples of every kind: a flood of one kind must not hide another.
    let per_kind = (limit / counts.len().max(1)).max(3);
    let mut shown: BTreeMap<&str, usize> = BTreeMap::new();
    for v in violations {
        let n = shown.entry(v.check).or_default();
        if *n < per_kind {
            *n += 1;
            out.push_str(&format!("{v}\n"));
        }
    }
    let left = violations.len() - shown.values().sum::<usize>();
    if left > 0 {
        out.push_str(&format!("... and {left} more\n"));
    }
    out
}

/// Bytes as an escaped string, long values cut in the middle: reports must show torn bytes.
pub fn esc(bytes: &[u8]) -> String {
    /// One run of bytes, escaped so NULs and cuts are visible.
    fn one(out: &mut String, b: &[u8]) {
        for &c in b {
            match c {
                b'\n' => out.push_str("\\n"),
                b'\\' => out.push_str("\\\\"),
                b'"' => out.push_str("\\\""),
                0 => out.push_str("\\0"),
                0x20..=0x7e => out.push(c as char),
                _ => out.push_str(&format!("\\x{c:02x}")),
            }
        }
    }
    let mut out = format!("{}B \"", bytes.len());
    if bytes.len() <= 96 {
        one(&mut out, bytes);
    } else {
        one(&mut out, &bytes[..48]);
        out.push_str("...");
        one(&mut out, &bytes[bytes.len() - 40..]);
    }
    out.push('"');
    out
}

/// A value or "absent": reads of absent keys are results too.
fn esc_value(v: Option<&[u8]>) -> String {
    v.map_or_else(|| "absent".to_string(), esc)
}

impl History {
    /// Signed nanoseconds since the start (hand-built histories may precede it).
    fn ns(&self, t: Instant) -> i64 {
        match t.checked_duration_since(self.t0) {
            Some(d) => d.as_nanos() as i64,
            None => -(self.t0.duration_since(t).as_nanos() as i64),
        }
    }

    fn ms(&self, t: Instant) -> String {
        format!("{:+.3}ms", self.ns(t) as f64 / 1e6)
    }

    /// One op on one line: id, who, what, when, result, bytes.
    pub fn describe(&self, op: &Op) -> String {
        let result = match op.result {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("errno {e}"),
        };
        let bytes = match op.kind {
            Kind::Delete => String::new(),
            Kind::Read if op.observed() == Some(None) => " absent".into(),
            _ => format!(" {}", esc_value(op.value.as_deref())),
        };
        format!(
            "#{} {}/{} {:?} [{} .. {}] {}{}",
            op.id,
            op.node,
            op.process,
            op.kind,
            self.ms(op.invoke),
            self.ms(op.ret),
            result,
            bytes
        )
    }

    fn by_key(&self) -> BTreeMap<&str, Vec<&Op>> {
        let mut m: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
        for op in &self.ops {
            m.entry(op.key.as_str()).or_default().push(op);
        }
        m
    }
}

/// Why a read's bytes match no write: the common torn shapes, named.
fn explain_torn(h: &History, read: &[u8], writes: &[&Op]) -> String {
    let common = |a: &[u8], b: &[u8]| a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let mut best: Option<(&Op, usize)> = None;
    for w in writes {
        let p = common(read, w.written().unwrap_or_default());
        if best.is_none_or(|(_, bp)| p > bp) {
            best = Some((w, p));
        }
    }
    let Some((w, p)) = best else {
        return "no write on this key was invoked before it returned".into();
    };
    let wv = w.written().unwrap_or_default();
    // The length a torn read took, when another write had it: the cached size of that write.
    let sized = writes.iter().rev().find(|x| x.id != w.id && x.written().is_some_and(|v| v.len() == read.len()));
    let cut = sized.map_or_else(String::new, |x| format!(", cut at the length of write #{}", x.id));
    let shape = if p == read.len() && p < wv.len() {
        format!("a prefix ({p} of {} bytes) of write {}{cut}", wv.len(), h.describe(w))
    } else if p == wv.len() && read[p..].iter().all(|&c| c == 0) {
        format!("write {} padded with {} NUL bytes", h.describe(w), read.len() - p)
    } else if let Some(x) = writes.iter().find(|x| {
        let xv = x.written().unwrap_or_default();
        p > 0 && xv.len() >= read.len() && xv[p..read.len()] == read[p..]
    }) {
        format!(
            "the first {p} bytes of write {} then bytes {p}..{} of write {}",
            h.describe(w),
            read.len(),
            h.describe(x)
        )
    } else {
        format!("shares its first {p} bytes with write {}", h.describe(w))
    };
    let recent: Vec<String> = writes.iter().rev().take(3).map(|w| h.describe(w)).collect();
    format!("{shape}; latest writes invoked before it returned: [{}]", recent.join("; "))
}

/// Writes that could have produced a value: refused creates and deletes never touched it, but
/// a refused write's bytes were visible on its node while it was open.
fn producers<'a>(ops: &[&'a Op]) -> Vec<&'a Op> {
    ops.iter()
        .copied()
        .filter(|o| o.is_write() && o.kind != Kind::Append && !(matches!(o.kind, Kind::Create | Kind::Delete) && o.effect() == Effect::Refused))
        .collect()
}

/// (a) Every read returns the initial value, absent, or a value some write on its key that
/// was invoked before the read returned produced. `initial`: keys that held bytes at the start.
pub fn check_reads_written(h: &History, initial: &BTreeMap<String, Vec<u8>>) -> Vec<Violation> {
    let mut out = Vec::new();
    for (key, ops) in h.by_key() {
        let writes = producers(&ops);
        for r in &ops {
            let Some(seen) = r.observed() else { continue };
            if seen == initial.get(key).map(Vec::as_slice) {
                continue;
            }
            let before: Vec<&Op> = writes.iter().copied().filter(|w| w.invoke <= r.ret).collect();
            if before.iter().any(|w| w.written() == seen) {
                continue;
            }
            // On the writing node a read during an in-place rewrite (O_TRUNC, then write) sees
            // the bytes written so far, as POSIX has it: a prefix of a write overlapping it.
            let in_progress = |bytes: &[u8]| {
                writes.iter().any(|w| w.node == r.node && w.invoke <= r.ret && w.ret >= r.invoke && w.written().is_some_and(|v| v.starts_with(bytes)))
            };
            if seen.is_some_and(in_progress) {
                continue;
            }
            let detail = match seen {
                None => format!(
                    "read {} returned absent, but the key was never deleted (initially {})",
                    h.describe(r),
                    esc_value(initial.get(key).map(Vec::as_slice))
                ),
                Some(bytes) => {
                    let future = writes.iter().find(|w| w.written() == Some(bytes));
                    match future {
                        Some(w) => format!(
                            "read {} returned the value of write {}, invoked after the read returned",
                            h.describe(r),
                            h.describe(w)
                        ),
                        None => format!("read {} returned bytes no write produced: {}", h.describe(r), explain_torn(h, bytes, &before)),
                    }
                }
            };
            out.push(Violation {
                check: "a:read-of-unwritten",
                key: key.into(),
                detail,
            });
        }
    }
    out
}

/// (b) No stale read. For a read R with value v, each write S that could be its source (same
/// value, invoked before R returned; the initial value counts as a write at minus infinity) is
/// *superseded* when an acknowledged write W on the key was invoked after S returned and
/// returned at least `settle` before R was invoked. R is stale when every candidate source is
/// superseded. In-doubt sources are never superseded (they may have landed late).
pub fn check_no_stale_reads(h: &History, initial: &BTreeMap<String, Vec<u8>>, settle: Duration) -> Vec<Violation> {
    let mut out = Vec::new();
    for (key, ops) in h.by_key() {
        let writes = producers(&ops);
        let acked: Vec<&Op> = ops
            .iter()
            .copied()
            .filter(|o| o.is_write() && o.kind != Kind::Append && o.effect() == Effect::Acked)
            .collect();
        for r in &ops {
            let Some(seen) = r.observed() else { continue };
            let settled = |w: &&Op| w.ret + settle <= r.invoke;
            // Sources: (ret, op); None = the initial value.
            let mut sources: Vec<(Option<Instant>, Option<&Op>)> = Vec::new();
            if seen == initial.get(key).map(Vec::as_slice) {
                sources.push((None, None));
            }
            for w in writes.iter().filter(|w| w.invoke <= r.ret && w.written() == seen) {
                let ret = (w.effect() == Effect::Acked).then_some(w.ret);
                // An in-doubt source is never superseded.
                if ret.is_none() {
                    sources.clear();
                    break;
                }
                sources.push((ret, Some(w)));
            }
            if sources.is_empty() {
                continue; // unwritten (check a) or possibly fresh
            }
            let superseder = |src_ret: Option<Instant>| acked.iter().copied().filter(settled).find(|w| src_ret.is_none_or(|t| t < w.invoke));
            let all: Option<Vec<&Op>> = sources.iter().map(|(t, _)| superseder(*t)).collect();
            let Some(by) = all else { continue };
            let newest = acked.iter().copied().filter(settled).max_by_key(|w| w.ret).unwrap();
            let src = sources
                .iter()
                .map(|(_, s)| s.map_or_else(|| "the initial value".to_string(), |s| h.describe(s)))
                .collect::<Vec<_>>()
                .join("; ");
            out.push(Violation {
                check: "b:stale-read",
                key: key.into(),
                detail: format!(
                    "read {} returned {} from [{src}], superseded by {} which returned >= {:?} before the read; newest settled write: {}",
                    h.describe(r),
                    esc_value(seen),
                    h.describe(by[0]),
                    settle,
                    h.describe(newest)
                ),
            });
        }
    }
    out
}

/// A per-key history larger than this is not searched (reported instead): drivers bound it.
pub const MAX_OPS_PER_KEY: usize = 4000;
/// Memoized states per key before the search gives up (reported, never passed silently).
pub const MAX_STATES: usize = 200_000;

/// The register model's operations, values interned.
#[derive(Debug, Clone, Copy)]
enum MKind {
    /// An exclusive create that won.
    Create(u32),
    /// An exclusive create that got EEXIST: the key was held.
    CreateFail,
    /// An acknowledged overwrite.
    Write(u32),
    /// An acknowledged unlink.
    Delete,
    /// An unlink that got ENOENT: the key was absent.
    DeleteFail,
    /// A read of absent or of a value.
    Read(Option<u32>),
    /// A create in doubt: may be linearized anywhere after its call, or never.
    MaybeCreate(u32),
    /// A write in doubt.
    MaybeWrite(u32),
    /// A delete in doubt.
    MaybeDelete,
}

/// One op as the search sees it: times in nanoseconds, reads' calls moved by the slack.
#[derive(Debug, Clone, Copy)]
struct MOp {
    /// The recorded op's id, for reports.
    op: usize,
    /// Earliest linearization point.
    call: i64,
    /// Latest linearization point (`i64::MAX` when in doubt).
    ret: i64,
    /// What it does to the register.
    kind: MKind,
}

impl MOp {
    /// Definite ops must all be linearized; ops in doubt may be left out.
    fn definite(&self) -> bool {
        !matches!(self.kind, MKind::MaybeCreate(_) | MKind::MaybeWrite(_) | MKind::MaybeDelete)
    }

    /// The state after this op in `s`: `Some((next, changed))`, or `None` if its result is
    /// impossible in `s`.
    fn apply(&self, s: Option<u32>) -> Option<(Option<u32>, bool)> {
        match (self.kind, s) {
            (MKind::Create(v) | MKind::MaybeCreate(v), None) => Some((Some(v), true)),
            (MKind::CreateFail, Some(_)) => Some((s, false)),
            (MKind::Write(v) | MKind::MaybeWrite(v), _) => Some((Some(v), true)),
            (MKind::Delete | MKind::MaybeDelete, Some(_)) => Some((None, true)),
            (MKind::DeleteFail, None) => Some((None, false)),
            (MKind::Read(x), _) if x == s => Some((s, false)),
            _ => None,
        }
    }
}

/// The Wing-Gong search over one key's ops.
struct Search<'a> {
    /// Sorted by call.
    ops: &'a [MOp],
    /// How many must be linearized.
    definite: usize,
    /// (linearized set, state) pairs already explored: the search is exponential without it.
    memo: HashSet<(Vec<u64>, Option<u32>)>,
    /// Set when `MAX_STATES` was reached: the verdict is then "undecided", reported.
    exhausted: bool,
    /// The furthest point reached (count, set, state), to show where the history breaks.
    deepest: (usize, Vec<u64>, Option<u32>),
}

/// Whether op `i` is in the linearized set.
fn bit(b: &[u64], i: usize) -> bool {
    b[i / 64] >> (i % 64) & 1 == 1
}

/// Adds or removes op `i` (the search backtracks in place instead of copying sets).
fn flip(b: &mut [u64], i: usize) {
    b[i / 64] ^= 1 << (i % 64);
}

impl Search<'_> {
    /// The earliest return among pending definite ops: only ops invoked by then can go next.
    fn horizon(&self, done: &[u64]) -> i64 {
        self.ops
            .iter()
            .enumerate()
            .filter(|(i, o)| o.definite() && !bit(done, *i))
            .map(|(_, o)| o.ret)
            .min()
            .unwrap_or(i64::MAX)
    }

    /// Depth-first search for a linearization of the pending ops from `state`.
    fn dfs(&mut self, done: &mut Vec<u64>, mut ndone: usize, state: Option<u32>) -> bool {
        // Ops that leave the state alone and fit it can go first without loss: moving one to
        // the front of any linearization keeps it valid, and only widens the horizon.
        let mut greedy = Vec::new();
        loop {
            let horizon = self.horizon(done);
            let before = greedy.len();
            for (i, o) in self.ops.iter().enumerate() {
                if o.call > horizon {
                    break;
                }
                if !bit(done, i) && o.definite() && matches!(o.apply(state), Some((_, false))) {
                    flip(done, i);
                    greedy.push(i);
                }
            }
            if greedy.len() == before {
                break;
            }
        }
        ndone += greedy.len();
        let found = self.branch(done, ndone, state);
        for i in greedy {
            flip(done, i);
        }
        found
    }

    fn branch(&mut self, done: &mut Vec<u64>, ndone: usize, state: Option<u32>) -> bool {
        if ndone == self.definite {
            return true;
        }
        if ndone > self.deepest.0 {
            self.deepest = (ndone, done.clone(), state);
        }
        if self.memo.len() >= MAX_STATES {
            self.exhausted = true;
            return false;
        }
        if !self.memo.insert((done.clone(), state)) {
            return false;
        }
        let horizon = self.horizon(done);
        for i in 0..self.ops.len() {
            let o = self.ops[i];
            if o.call > horizon {
                break;
            }
            if bit(done, i) {
                continue;
            }
            if let Some((next, true)) = o.apply(state) {
                flip(done, i);
                let found = self.dfs(done, ndone + o.definite() as usize, next);
                flip(done, i);
                if found {
                    return true;
                }
                if self.exhausted {
                    return false;
                }
            }
        }
        false
    }
}

/// (c) Per key, a linearization of creates, writes, deletes and reads against a register
/// (absent | held(v)) exists, with reads' invocations moved `read_slack` earlier. Two
/// acknowledged creates without a delete between, an `EEXIST` with no owner, or a read of
/// absent or of an older value after the owner's write returned (plus the slack) fail.
pub fn check_linearizable(h: &History, read_slack: Duration) -> Vec<Violation> {
    let mut out = Vec::new();
    let slack = read_slack.as_nanos() as i64;
    for (key, ops) in h.by_key() {
        if ops.len() > MAX_OPS_PER_KEY {
            out.push(Violation {
                check: "c:linearizable",
                key: key.into(),
                detail: format!("{} ops: more than {MAX_OPS_PER_KEY}, not searched (record fewer)", ops.len()),
            });
            continue;
        }
        let mut values: HashMap<Vec<u8>, u32> = HashMap::new();
        let mut intern = |v: &[u8]| -> u32 {
            let n = values.len() as u32;
            *values.entry(v.to_vec()).or_insert(n)
        };
        let mut mops = Vec::new();
        for o in &ops {
            let (call, ret) = (h.ns(o.invoke), h.ns(o.ret));
            let eff = o.effect();
            let kind = match (o.kind, eff) {
                (Kind::Read, _) => match o.observed() {
                    Some(v) => MKind::Read(v.map(&mut intern)),
                    None => continue,
                },
                (Kind::Create, Effect::Acked) => MKind::Create(intern(o.written().unwrap())),
                (Kind::Create, Effect::Refused) => MKind::CreateFail,
                (Kind::Create, Effect::InDoubt) => MKind::MaybeCreate(intern(o.written().unwrap())),
                (Kind::Write, Effect::Acked) => MKind::Write(intern(o.written().unwrap())),
                (Kind::Write, Effect::Refused) => continue,
                (Kind::Write, Effect::InDoubt) => MKind::MaybeWrite(intern(o.written().unwrap())),
                (Kind::Delete, Effect::Acked) => MKind::Delete,
                (Kind::Delete, Effect::Refused) => MKind::DeleteFail,
                (Kind::Delete, Effect::InDoubt) => MKind::MaybeDelete,
                (Kind::Append, _) => continue,
            };
            let call = if matches!(kind, MKind::Read(_)) { call - slack } else { call };
            let ret = if o.effect() == Effect::InDoubt && o.kind != Kind::Read {
                i64::MAX
            } else {
                ret
            };
            mops.push(MOp { op: o.id, call, ret, kind });
        }
        mops.sort_by_key(|m| m.call);
        let definite = mops.iter().filter(|m| m.definite()).count();
        let words = mops.len().div_ceil(64).max(1);
        let mut s = Search {
            ops: &mops,
            definite,
            memo: HashSet::new(),
            exhausted: false,
            deepest: (0, vec![0; words], None),
        };
        let mut done = vec![0u64; words];
        if s.dfs(&mut done, 0, None) {
            continue;
        }
        let by_id: HashMap<usize, &Op> = ops.iter().map(|o| (o.id, *o)).collect();
        let name = |v: Option<u32>| -> String {
            match v {
                None => "absent".into(),
                Some(n) => esc(values.iter().find(|(_, &i)| i == n).map(|(b, _)| b.as_slice()).unwrap_or_default()),
            }
        };
        let owners: Vec<String> = ops
            .iter()
            .filter(|o| o.kind == Kind::Create && o.effect() == Effect::Acked)
            .map(|o| h.describe(o))
            .collect();
        let writes: Vec<String> = ops
            .iter()
            .filter(|o| o.kind == Kind::Write && o.effect() == Effect::Acked)
            .take(3)
            .map(|o| h.describe(o))
            .collect();
        let (n, ref dset, state) = s.deepest;
        let pending: Vec<String> = mops
            .iter()
            .enumerate()
            .filter(|(i, m)| !bit(dset, *i) && m.definite())
            .take(4)
            .map(|(_, m)| h.describe(by_id[&m.op]))
            .collect();
        let why = if s.exhausted {
            format!("search gave up after {MAX_STATES} states")
        } else {
            "no linearization exists".into()
        };
        out.push(Violation {
            check: "c:linearizable",
            key: key.into(),
            detail: format!(
                "{why} ({} ops, read slack {read_slack:?}); acknowledged creates (owners): [{}]; acknowledged writes: [{}]; at best {n} of {definite} ops linearized, state {}, first pending: [{}]",
                mops.len(),
                owners.join("; "),
                writes.join("; "),
                name(state),
                pending.join("; ")
            ),
        });
    }
    out
}

/// A node's last word on a key, read after the writers stopped and propagation settled.
#[derive(Debug, Clone)]
pub struct Final {
    /// The node.
    pub node: String,
    /// The key.
    pub key: String,
    /// Its bytes, `None` when absent.
    pub value: Option<Vec<u8>>,
    /// Its revision (`user.syncfs.rev`), when it has one.
    pub rev: Option<String>,
}

/// (d) Last-write-wins keys converge: every node holds the same value and revision per key,
/// one value per revision, and a value some write produced (or the initial one).
pub fn check_lww_converged(h: &History, initial: &BTreeMap<String, Vec<u8>>, finals: &[Final]) -> Vec<Violation> {
    let mut out = Vec::new();
    let by_key = h.by_key();
    let mut keys: BTreeMap<&str, Vec<&Final>> = BTreeMap::new();
    for f in finals {
        keys.entry(f.key.as_str()).or_default().push(f);
    }
    let show = |f: &Final| format!("{}: {} rev {:?}", f.node, esc_value(f.value.as_deref()), f.rev);
    for (key, fs) in keys {
        let first = fs[0];
        if fs.iter().any(|f| f.value != first.value || f.rev != first.rev) {
            out.push(Violation {
                check: "d:lww-converged",
                key: key.into(),
                detail: format!("nodes disagree: [{}]", fs.iter().map(|f| show(f)).collect::<Vec<_>>().join("; ")),
            });
        }
        let mut per_rev: BTreeMap<&str, HashSet<Option<&[u8]>>> = BTreeMap::new();
        for f in &fs {
            if let Some(r) = &f.rev {
                per_rev.entry(r).or_default().insert(f.value.as_deref());
            }
        }
        for (rev, vals) in per_rev {
            if vals.len() > 1 {
                out.push(Violation {
                    check: "d:lww-converged",
                    key: key.into(),
                    detail: format!(
                        "revision {rev} has {} values: [{}]",
                        vals.len(),
                        fs.iter().map(|f| show(f)).collect::<Vec<_>>().join("; ")
                    ),
                });
            }
        }
        let writes = producers(by_key.get(key).map(Vec::as_slice).unwrap_or_default());
        for f in &fs {
            let v = f.value.as_deref();
            if v != initial.get(key).map(Vec::as_slice) && !writes.iter().any(|w| w.written() == v) {
                out.push(Violation {
                    check: "d:lww-converged",
                    key: key.into(),
                    detail: format!(
                        "final value on {} is one no write produced: {}",
                        show(f),
                        explain_torn(h, v.unwrap_or_default(), &writes)
                    ),
                });
            }
        }
    }
    out
}

/// Every offset at which `needle` occurs in `hay`.
fn find_all(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    if needle.is_empty() || needle.len() > hay.len() {
        return Vec::new();
    }
    let first = needle[0];
    (0..=hay.len() - needle.len())
        .filter(|&i| hay[i] == first && &hay[i..i + needle.len()] == needle)
        .collect()
}

/// (e) One append order. `finals`: each node's file `key` after the writers stopped. Appended
/// records must be unique (each occurs once in a correct file). Reads recorded on `key` must
/// be prefixes of the final file.
pub fn check_appends(h: &History, key: &str, finals: &[(String, Vec<u8>)]) -> Vec<Violation> {
    let mut out = Vec::new();
    let v = |detail: String| Violation {
        check: "e:append-order",
        key: key.into(),
        detail,
    };
    let Some((n0, f0)) = finals.first() else { return out };
    for (n, f) in &finals[1..] {
        if f != f0 {
            let at = f.iter().zip(f0).take_while(|(a, b)| a == b).count();
            let ctx = |b: &[u8]| esc(&b[at.saturating_sub(16)..(at + 48).min(b.len())]);
            out.push(v(format!(
                "{n}'s file ({} bytes) differs from {n0}'s ({} bytes) at offset {at}: {n}: {} vs {n0}: {}",
                f.len(),
                f0.len(),
                ctx(f),
                ctx(f0)
            )));
        }
    }
    let appends: Vec<&Op> = h.ops.iter().filter(|o| o.key == key && o.kind == Kind::Append).collect();
    let mut seen_files: Vec<&[u8]> = Vec::new();
    for (node, file) in finals {
        if seen_files.contains(&file.as_slice()) {
            continue;
        }
        seen_files.push(file);
        let mut placed: Vec<(usize, usize, &Op)> = Vec::new();
        let mut pos: HashMap<usize, usize> = HashMap::new();
        for a in &appends {
            let rec = a.value.as_deref().unwrap_or_default();
            let at = find_all(file, rec);
            match (a.effect(), at.len()) {
                (Effect::Acked, 0) => out.push(v(format!("{node}'s file lacks acknowledged append {}", h.describe(a)))),
                (Effect::Refused, n) if n > 0 => out.push(v(format!("{node}'s file holds refused append {}", h.describe(a)))),
                (_, n) if n > 1 => out.push(v(format!("{node}'s file holds append {} {n} times, at offsets {at:?}", h.describe(a)))),
                _ => {}
            }
            if let Some(&p) = at.first() {
                placed.push((p, p + rec.len(), a));
                pos.insert(a.id, p);
            }
        }
        placed.sort_by_key(|p| p.0);
        let mut end = 0;
        for &(s, e, a) in &placed {
            if s > end {
                out.push(v(format!("{node}'s file has bytes nobody appended at {end}..{s}: {}", esc(&file[end..s]))));
            } else if s < end {
                out.push(v(format!("append {} at {s} overlaps the previous one ending at {end}", h.describe(a))));
            }
            end = end.max(e);
        }
        if end < file.len() {
            out.push(v(format!(
                "{node}'s file has bytes nobody appended at {end}..{}: {}",
                file.len(),
                esc(&file[end..])
            )));
        }
        let acked: Vec<&Op> = appends
            .iter()
            .copied()
            .filter(|a| a.effect() == Effect::Acked && pos.contains_key(&a.id))
            .collect();
        let mut misordered = 0;
        for x in &acked {
            for y in &acked {
                let same_process = x.node == y.node && x.process == y.process && x.id < y.id;
                if (x.ret < y.invoke || same_process) && pos[&x.id] > pos[&y.id] {
                    misordered += 1;
                    if misordered <= 5 {
                        out.push(v(format!(
                            "{node}'s file has {} (at {}) after {} (at {}), though the first returned before the second was invoked",
                            h.describe(x),
                            pos[&x.id],
                            h.describe(y),
                            pos[&y.id]
                        )));
                    }
                }
            }
        }
        if misordered > 5 {
            out.push(v(format!("... {} misordered pairs in all on {node}", misordered)));
        }
    }
    for r in h.ops.iter().filter(|o| o.key == key && o.kind == Kind::Read) {
        if let Some(Some(bytes)) = r.observed() {
            if !f0.starts_with(bytes) {
                let at = bytes.iter().zip(f0).take_while(|(a, b)| a == b).count();
                out.push(v(format!(
                    "read {} is not a prefix of {n0}'s final file: diverges at offset {at}: read {} vs final {}",
                    h.describe(r),
                    esc(&bytes[at..(at + 48).min(bytes.len())]),
                    esc(&f0[at.min(f0.len())..(at + 48).min(f0.len())])
                )));
            }
        }
    }
    out
}

/// (f) Field merges lose nothing. Field writes are ops of kind Write with key `doc#field`
/// and the field's new value as bytes; each field has one writer (so no legitimate conflict).
/// `finals`: each node's parsed top-level map of `doc`. Every field must hold its last
/// acknowledged value (or that of a write invoked after it returned, in doubt or concurrent),
/// a field nobody wrote must keep its initial value, and every node must agree.
pub fn check_fields(h: &History, doc: &str, initial: &BTreeMap<String, String>, finals: &[(String, BTreeMap<String, String>)]) -> Vec<Violation> {
    let mut out = Vec::new();
    let v = |key: String, detail: String| Violation {
        check: "f:field-merge",
        key,
        detail,
    };
    let prefix = format!("{doc}#");
    let mut fields: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for o in &h.ops {
        if let (Some(f), Kind::Write) = (o.key.strip_prefix(&prefix), o.kind) {
            fields.entry(f).or_default().push(o);
        }
    }
    for (node, map) in finals {
        for (field, ws) in &fields {
            let key = format!("{doc}#{field}");
            let acked: Vec<&Op> = ws.iter().copied().filter(|w| w.effect() == Effect::Acked).collect();
            // Allowed: acknowledged writes no other acknowledged write follows in real time,
            // and writes in doubt invoked after the last of those returned.
            let latest: Vec<&Op> = acked.iter().copied().filter(|w| !acked.iter().any(|x| w.ret < x.invoke)).collect();
            let mut allowed: Vec<&Op> = latest.clone();
            let floor = latest.iter().map(|w| w.invoke).min();
            allowed.extend(
                ws.iter()
                    .copied()
                    .filter(|w| w.effect() == Effect::InDoubt && floor.is_none_or(|t| w.invoke >= t)),
            );
            let have = map.get(*field);
            let ok = allowed.iter().any(|w| have.map(String::as_bytes) == w.value.as_deref()) || (acked.is_empty() && have == initial.get(*field));
            if !ok {
                let what = match have {
                    None => "lacks it".to_string(),
                    Some(x) => format!("has {}", esc(x.as_bytes())),
                };
                let older = have.and_then(|x| ws.iter().find(|w| w.value.as_deref() == Some(x.as_bytes())));
                out.push(v(
                    key,
                    format!(
                        "{node} {what}{}; last acknowledged: [{}]",
                        older.map_or_else(String::new, |w| format!(" (the value of older write {})", h.describe(w))),
                        latest.iter().map(|w| h.describe(w)).collect::<Vec<_>>().join("; ")
                    ),
                ));
            }
        }
        for (field, value) in map {
            if !fields.contains_key(field.as_str()) && initial.get(field) != Some(value) {
                out.push(v(
                    format!("{doc}#{field}"),
                    format!(
                        "{node} has {} = {}, which nobody wrote (initially {:?})",
                        field,
                        esc(value.as_bytes()),
                        initial.get(field)
                    ),
                ));
            }
        }
        for (field, value) in initial {
            if !fields.contains_key(field.as_str()) && map.get(field) != Some(value) {
                out.push(v(
                    format!("{doc}#{field}"),
                    format!("{node} lost untouched field {field} = {}", esc(value.as_bytes())),
                ));
            }
        }
    }
    if let Some((n0, m0)) = finals.first() {
        for (n, m) in &finals[1..] {
            if m != m0 {
                let diff: Vec<String> = m0
                    .keys()
                    .chain(m.keys())
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .filter(|k| m0.get(*k) != m.get(*k))
                    .take(8)
                    .map(|k| format!("{k}: {n0}={:?} {n}={:?}", m0.get(k), m.get(k)))
                    .collect();
                out.push(v(doc.into(), format!("{n} and {n0} disagree: [{}]", diff.join("; "))));
            }
        }
    }
    out
}

/// The checks against hand-built histories: each catches its violation and accepts a valid
/// history. Plain `#[test]`s: this crate is a test binary, so they run with the mount tests.
mod tests {
    use super::*;

    /// Hand-built histories: times in milliseconds from the start.
    struct B {
        /// Holds the ops and the start instant.
        rec: Recorder,
    }

    impl B {
        /// An empty history starting now.
        fn new() -> B {
            B { rec: Recorder::new() }
        }

        /// The instant `ms` milliseconds after the start.
        fn at(&self, ms: f64) -> Instant {
            self.rec.t0 + Duration::from_micros((ms * 1000.0) as u64)
        }

        /// Any op, timed in milliseconds.
        #[allow(clippy::too_many_arguments)]
        fn op(&self, node: &str, proc_: &str, key: &str, kind: Kind, call: f64, ret: f64, value: Option<&str>, result: Result<(), i32>) -> &Self {
            self.rec.record(
                node,
                proc_,
                key,
                kind,
                self.at(call),
                self.at(ret),
                value.map(|v| v.as_bytes().to_vec()),
                result,
            );
            self
        }

        /// An acknowledged whole-value write.
        fn w(&self, node: &str, key: &str, call: f64, ret: f64, v: &str) -> &Self {
            self.op(node, "w", key, Kind::Write, call, ret, Some(v), Ok(()))
        }

        /// A read of `v` (`None`: ENOENT).
        fn r(&self, node: &str, key: &str, call: f64, ret: f64, v: Option<&str>) -> &Self {
            let result = if v.is_some() { Ok(()) } else { Err(libc::ENOENT) };
            self.op(node, "r", key, Kind::Read, call, ret, v, result)
        }

        /// An exclusive create that won or got EEXIST.
        fn create(&self, node: &str, proc_: &str, key: &str, call: f64, ret: f64, v: &str, won: bool) -> &Self {
            let result = if won { Ok(()) } else { Err(libc::EEXIST) };
            self.op(node, proc_, key, Kind::Create, call, ret, Some(v), result)
        }

        /// The history so far.
        fn h(&self) -> History {
            self.rec.history()
        }
    }

    /// Every key initially absent.
    fn none() -> BTreeMap<String, Vec<u8>> {
        BTreeMap::new()
    }

    /// Asserts a violation of `check` mentions `needle`: the report must name the evidence.
    fn must_find(vs: &[Violation], check: &str, needle: &str) {
        assert!(
            vs.iter().any(|v| v.check.starts_with(check) && v.to_string().contains(needle)),
            "expected a {check} violation mentioning {needle:?}, got:\n{}",
            report(vs, 20)
        );
    }

    /// Old values during a write and new ones after it are fine, on any node.
    #[test]
    fn reads_of_written_values_pass() {
        let b = B::new();
        b.r("b", "k", 0.0, 1.0, None)
            .w("a", "k", 2.0, 3.0, "short")
            .r("b", "k", 2.5, 2.8, Some("short"))
            .w("a", "k", 4.0, 5.0, "a much longer value")
            .r("b", "k", 4.5, 4.6, Some("short"))
            .r("c", "k", 6.0, 7.0, Some("a much longer value"));
        assert!(check_reads_written(&b.h(), &none()).is_empty());
        assert!(check_no_stale_reads(&b.h(), &none(), Duration::from_millis(1)).is_empty());
    }

    /// The three torn shapes seen on the mounts, each caught and named.
    #[test]
    fn torn_reads_are_caught_and_explained() {
        let b = B::new();
        b.w("a", "k", 0.0, 1.0, "0000|aaaaaaaaaaaaaaaaaaaa").w("a", "k", 2.0, 3.0, "0001|bb");
        // New data cut at the old length would need old bytes; new data padded with NULs; old
        // data cut at the new length.
        b.r("b", "k", 2.0, 4.0, Some("0001|bb\0\0\0\0\0"))
            .r("b", "k", 2.0, 4.0, Some("0000|aa"))
            .r("b", "k", 2.0, 4.0, Some("0001|bbaaaaaaaaaaaaaaaaaa"));
        let vs = check_reads_written(&b.h(), &none());
        assert_eq!(vs.len(), 3, "{}", report(&vs, 10));
        must_find(&vs, "a", "padded with 5 NUL bytes");
        must_find(&vs, "a", "a prefix (7 of 25 bytes)");
        must_find(&vs, "a", "the first 7 bytes of write #1");
        must_find(&vs, "a", "\\0\\0");
    }

    /// A value can only come from a write already invoked, never from a refused create.
    #[test]
    fn a_prefix_is_a_written_value_only_on_the_writing_node_during_the_write() {
        let b = B::new();
        b.w("a", "k", 0.0, 1.0, "old value").w("a", "k", 2.0, 4.0, "new value");
        // On a, during its in-place rewrite: the bytes so far (POSIX). Elsewhere, or after the
        // write returned, a prefix is a torn read.
        b.r("a", "k", 2.5, 3.0, Some("")).r("a", "k", 2.5, 3.0, Some("new"));
        b.r("b", "k", 2.5, 3.0, Some("new")).r("a", "k", 5.0, 6.0, Some("new"));
        let vs = check_reads_written(&b.h(), &none());
        assert_eq!(vs.len(), 2, "{}", report(&vs, 10));
    }

    #[test]
    fn reads_from_the_future_and_of_losers_are_caught() {
        let b = B::new();
        b.r("b", "k", 0.0, 1.0, Some("later")).w("a", "k", 2.0, 3.0, "later");
        b.create("a", "t1", "c", 0.0, 1.0, "winner", true)
            .create("b", "t2", "c", 0.0, 1.0, "loser", false)
            .r("b", "c", 2.0, 3.0, Some("loser"));
        let vs = check_reads_written(&b.h(), &none());
        must_find(&vs, "a", "invoked after the read returned");
        must_find(&vs, "a", "\"loser\"");
        assert_eq!(vs.len(), 2);
        // Absent with an initial value and no delete is unwritten too.
        let b = B::new();
        b.r("b", "k", 0.0, 1.0, None);
        let init = BTreeMap::from([("k".to_string(), b"x".to_vec())]);
        must_find(&check_reads_written(&b.h(), &init), "a", "never deleted");
    }

    /// Old values are fine within the settle bound and stale after it; deletes count.
    #[test]
    fn stale_reads_are_caught_after_settle_only() {
        let settle = Duration::from_millis(100);
        let b = B::new();
        b.w("a", "k", 0.0, 1.0, "v1").w("a", "k", 10.0, 11.0, "v2");
        // Within settle of v2: v1 is fine. After: stale.
        b.r("b", "k", 50.0, 51.0, Some("v1")).r("b", "k", 200.0, 201.0, Some("v1"));
        // Absent after settle of the first write: stale too.
        b.r("c", "k", 300.0, 301.0, None);
        let vs = check_no_stale_reads(&b.h(), &none(), settle);
        assert_eq!(vs.len(), 2, "{}", report(&vs, 10));
        must_find(&vs, "b:stale", "returned 2B \"v1\"");
        must_find(&vs, "b:stale", "the initial value");
        // A write concurrent with the newest settled one may be read: it may be ordered last.
        let b = B::new();
        b.w("a", "k", 0.0, 10.0, "x")
            .w("b", "k", 5.0, 6.0, "y")
            .r("c", "k", 500.0, 501.0, Some("x"))
            .r("c", "k", 500.0, 501.0, Some("y"));
        assert!(check_no_stale_reads(&b.h(), &none(), settle).is_empty());
        // Deletes are writes of "absent".
        let b = B::new();
        b.w("a", "k", 0.0, 1.0, "x")
            .op("a", "w", "k", Kind::Delete, 2.0, 3.0, None, Ok(()))
            .r("b", "k", 500.0, 501.0, Some("x"))
            .r("b", "k", 500.0, 501.0, None);
        let vs = check_no_stale_reads(&b.h(), &none(), settle);
        assert_eq!(vs.len(), 1, "{}", report(&vs, 10));
        must_find(&vs, "b:stale", "Delete");
    }

    /// A race with one owner, its content written after the create, and lagging readers.
    #[test]
    fn one_owner_per_lock_passes() {
        let b = B::new();
        for t in 0..12 {
            let won = t == 5;
            b.create(&format!("n{}", t % 2), &format!("t{t}"), "lock", t as f64 * 0.1, 5.0 + t as f64, "", won);
        }
        // The owner writes its content after the create (open, then write + close).
        b.op("n1", "t5", "lock", Kind::Write, 10.0, 11.0, Some("me5 content"), Ok(()));
        b.r("n0", "lock", 0.0, 0.5, None)
            .r("n0", "lock", 6.0, 7.0, Some(""))
            .r("n1", "lock", 10.5, 10.6, Some(""))
            .r("n0", "lock", 20.0, 21.0, Some("me5 content"));
        // Within the slack another node may still read absent.
        b.r("n2", "lock", 12.0, 13.0, None);
        let vs = check_linearizable(&b.h(), Duration::from_millis(50));
        assert!(vs.is_empty(), "{}", report(&vs, 10));
    }

    /// Two acknowledged creates need a delete between them.
    #[test]
    fn two_lock_owners_are_caught() {
        let b = B::new();
        b.create("n0", "t0", "lock", 0.0, 1.0, "a", true)
            .create("n1", "t1", "lock", 0.5, 2.0, "b", true);
        let vs = check_linearizable(&b.h(), Duration::ZERO);
        assert_eq!(vs.len(), 1);
        must_find(&vs, "c", "no linearization");
        must_find(&vs, "c", "\"a\"");
        must_find(&vs, "c", "\"b\"");
        // Released in between: fine.
        let b = B::new();
        b.create("n0", "t0", "lock", 0.0, 1.0, "a", true)
            .op("n0", "t0", "lock", Kind::Delete, 2.0, 3.0, None, Ok(()))
            .create("n1", "t1", "lock", 4.0, 5.0, "b", true);
        assert!(check_linearizable(&b.h(), Duration::ZERO).is_empty());
    }

    /// The claim defect: empty (or absent) beyond the slack after the owner closed.
    #[test]
    fn a_claim_read_empty_after_the_owner_closed_is_caught() {
        let b = B::new();
        b.create("n0", "t0", "lock", 0.0, 1.0, "", true)
            .op("n0", "t0", "lock", Kind::Write, 1.0, 2.0, Some("me"), Ok(()));
        b.r("n1", "lock", 1.5, 1.6, Some(""));
        assert!(check_linearizable(&b.h(), Duration::from_millis(10)).is_empty());
        b.r("n1", "lock", 500.0, 500.1, Some(""));
        let vs = check_linearizable(&b.h(), Duration::from_millis(10));
        must_find(&vs, "c", "state 2B \"me\"");
        // Absent long after the create is caught; within the slack it is not.
        let b = B::new();
        b.create("n0", "t0", "lock", 0.0, 1.0, "me", true).r("n1", "lock", 5.0, 6.0, None);
        assert!(check_linearizable(&b.h(), Duration::from_millis(10)).is_empty());
        assert_eq!(check_linearizable(&b.h(), Duration::from_millis(2)).len(), 1);
    }

    /// EEXIST needs an owner; a create in doubt may or may not be one.
    #[test]
    fn eexist_without_owner_and_in_doubt_creates() {
        let b = B::new();
        b.create("n0", "t0", "lock", 0.0, 1.0, "a", false);
        must_find(&check_linearizable(&b.h(), Duration::ZERO), "c", "no linearization");
        // A create in doubt (a timeout) may be the owner.
        let b = B::new();
        b.op("n0", "t0", "lock", Kind::Create, 0.0, 1.0, Some("a"), Err(libc::ETIMEDOUT))
            .create("n1", "t1", "lock", 5.0, 6.0, "b", false)
            .r("n1", "lock", 7.0, 8.0, Some("a"));
        assert!(check_linearizable(&b.h(), Duration::ZERO).is_empty());
        // ... or not.
        let b = B::new();
        b.op("n0", "t0", "lock", Kind::Create, 0.0, 1.0, Some("a"), Err(libc::ETIMEDOUT))
            .create("n1", "t1", "lock", 5.0, 6.0, "b", true);
        assert!(check_linearizable(&b.h(), Duration::ZERO).is_empty());
    }

    /// Greedy placement of reads and losers keeps a crowded key cheap, and still exact.
    #[test]
    fn wide_races_with_many_reads_stay_fast() {
        let b = B::new();
        for t in 0..32 {
            b.create(
                &format!("n{}", t % 2),
                &format!("t{t}"),
                "lock",
                t as f64 * 0.01,
                10.0 + t as f64 * 0.3,
                &format!("m{t}"),
                t == 17,
            );
        }
        for i in 0..600 {
            let at = i as f64 * 0.05;
            b.r(&format!("n{}", i % 3), "lock", at, at + 0.04, if at < 8.0 { None } else { Some("m17") });
        }
        let start = Instant::now();
        assert!(check_linearizable(&b.h(), Duration::from_millis(20)).is_empty());
        assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
        // A second owner in the same crowd is still found.
        b.create("n1", "late", "lock", 40.0, 41.0, "m99", true);
        assert_eq!(check_linearizable(&b.h(), Duration::from_millis(20)).len(), 1);
    }

    /// Agreement, one value per revision, and only written values.
    #[test]
    fn lww_convergence() {
        let b = B::new();
        b.w("a", "k", 0.0, 1.0, "v1").w("a", "k", 2.0, 3.0, "v2");
        let f = |node: &str, v: &str, rev: &str| Final {
            node: node.into(),
            key: "k".into(),
            value: Some(v.as_bytes().to_vec()),
            rev: Some(rev.into()),
        };
        assert!(check_lww_converged(&b.h(), &none(), &[f("a", "v2", "7"), f("b", "v2", "7"), f("c", "v2", "7")]).is_empty());
        let vs = check_lww_converged(&b.h(), &none(), &[f("a", "v2", "7"), f("b", "v1", "6")]);
        must_find(&vs, "d", "nodes disagree");
        let vs = check_lww_converged(&b.h(), &none(), &[f("a", "v2", "7"), f("b", "v1", "7")]);
        must_find(&vs, "d", "revision 7 has 2 values");
        let vs = check_lww_converged(&b.h(), &none(), &[f("a", "v2\0\0", "7"), f("b", "v2\0\0", "7")]);
        must_find(&vs, "d", "padded with 2 NUL");
    }

    /// Two writers, one append in doubt, one early read.
    fn appends() -> B {
        let b = B::new();
        b.op("a", "p1", "log", Kind::Append, 0.0, 1.0, Some("a1\n"), Ok(()));
        b.op("a", "p1", "log", Kind::Append, 2.0, 3.0, Some("a2\n"), Ok(()));
        b.op("b", "p2", "log", Kind::Append, 0.5, 2.5, Some("b1\n"), Ok(()));
        b.op("b", "p2", "log", Kind::Append, 4.0, 5.0, Some("b2\n"), Err(libc::EAGAIN));
        b.r("c", "log", 1.0, 1.1, Some("a1\n"));
        b
    }

    /// Concurrent appends in either order pass, if every read is a prefix.
    #[test]
    fn append_order_valid_histories_pass() {
        let b = appends();
        for file in ["a1\nb1\na2\n", "b1\na1\na2\n", "a1\na2\nb1\nb2\n"] {
            let finals = vec![("a".to_string(), file.as_bytes().to_vec()), ("b".into(), file.as_bytes().to_vec())];
            let vs = check_appends(&b.h(), "log", &finals);
            // The read saw a1 first: only files starting with it fit.
            if file.starts_with("a1") {
                assert!(vs.is_empty(), "{file:?}: {}", report(&vs, 10));
            } else {
                assert_eq!(vs.len(), 1, "{}", report(&vs, 10));
                must_find(&vs, "e", "not a prefix");
            }
        }
    }

    /// Each way a log can go wrong, caught.
    #[test]
    fn lost_doubled_misordered_and_foreign_appends_are_caught() {
        let b = appends();
        let check = |files: &[&str]| {
            let finals: Vec<(String, Vec<u8>)> = files.iter().enumerate().map(|(i, f)| (format!("n{i}"), f.as_bytes().to_vec())).collect();
            check_appends(&b.h(), "log", &finals)
        };
        must_find(&check(&["a1\na2\n", "a1\na2\n"]), "e", "lacks acknowledged append #2");
        must_find(&check(&["a1\nb1\na2\na2\n"]), "e", "2 times");
        must_find(&check(&["a1\nb1\na2\n", "a1\na2\nb1\n"]), "e", "differs from n0's (9 bytes) at offset 3");
        must_find(&check(&["a2\na1\nb1\n"]), "e", "returned before the second was invoked");
        must_find(&check(&["a1\nb1\nXX\na2\n"]), "e", "nobody appended at 6..9");
        must_find(&check(&["a1\nb1\na2\nb"]), "e", "nobody appended at 9..10");
    }

    /// Valid merges pass (in-doubt fields either way); lost, reverted and foreign fields fail.
    #[test]
    fn field_merges() {
        let b = B::new();
        b.op("a", "p", "x.yml#a_1", Kind::Write, 0.0, 1.0, Some("v1"), Ok(()));
        b.op("a", "p", "x.yml#a_n", Kind::Write, 0.0, 1.0, Some("1"), Ok(()));
        b.op("a", "p", "x.yml#a_n", Kind::Write, 2.0, 3.0, Some("2"), Ok(()));
        b.op("b", "q", "x.yml#b_1", Kind::Write, 0.5, 1.5, Some("w1"), Ok(()));
        b.op("b", "q", "x.yml#b_2", Kind::Write, 4.0, 5.0, Some("w2"), Err(-1));
        let init = BTreeMap::from([("kind".to_string(), "rmw".to_string())]);
        let m = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>();
        let good = m(&[("kind", "rmw"), ("a_1", "v1"), ("a_n", "2"), ("b_1", "w1")]);
        assert!(check_fields(&b.h(), "x.yml", &init, &[("a".into(), good.clone()), ("b".into(), good.clone())]).is_empty());
        // The in-doubt write may have landed.
        let also = m(&[("kind", "rmw"), ("a_1", "v1"), ("a_n", "2"), ("b_1", "w1"), ("b_2", "w2")]);
        assert!(check_fields(&b.h(), "x.yml", &init, &[("a".into(), also.clone()), ("b".into(), also)]).is_empty());
        // Lost field, reverted field, foreign field, lost untouched field, disagreement.
        let bad = m(&[("a_1", "v1"), ("a_n", "1"), ("zz", "?")]);
        let vs = check_fields(&b.h(), "x.yml", &init, &[("a".into(), good), ("b".into(), bad)]);
        must_find(&vs, "f", "x.yml#b_1: b lacks it");
        must_find(&vs, "f", "b has 1B \"1\" (the value of older write #1");
        must_find(&vs, "f", "which nobody wrote");
        must_find(&vs, "f", "lost untouched field kind");
        must_find(&vs, "f", "b and a disagree");
    }

    /// Real files through the recorder from four threads: ordered, attributed, errno kept.
    #[test]
    fn the_recorder_is_shared_across_threads_and_records_errno() {
        let rec = std::sync::Arc::new(Recorder::new());
        let dir = tempfile::tempdir().unwrap();
        std::thread::scope(|s| {
            for t in 0..4 {
                // One file per thread: a concurrent reader of a local file may see it truncated.
                let (rec, path, key) = (rec.clone(), dir.path().join(format!("f{t}")), format!("f{t}"));
                s.spawn(move || {
                    for i in 0..25 {
                        let v = format!("{t}-{i}");
                        rec.write("n", &key, &path, v.as_bytes()).unwrap();
                        let _ = rec.read("n", &key, &path);
                    }
                });
            }
        });
        assert_eq!(rec.read("n", "g", &dir.path().join("missing")), Err(libc::ENOENT));
        let h = rec.history();
        assert_eq!(h.ops.len(), 201);
        assert!(h.ops.windows(2).all(|w| w[0].invoke <= w[1].invoke));
        assert!(check_reads_written(&h, &none()).is_empty());
        assert_eq!(h.ops.iter().filter(|o| o.key == "g" && o.observed() == Some(None)).count(), 1);
        // Four threads, four processes; each thread's ops are sequential.
        let procs: HashSet<&str> = h.ops.iter().filter(|o| o.key.starts_with('f')).map(|o| o.process.as_str()).collect();
        assert_eq!(procs.len(), 4);
    }
}
