//! The git thread: commits pending changes, pushes, fetches, merges, and installs the
//! branch's changes into the tree. It is the only code that moves refs, so a cycle never races
//! another; tier calls only write blobs and record pending changes.
//!
//! One cycle:
//! 1. **Commit** the pending changes once writes have been quiet for `git.quiet_ms` (or
//!    `git.max_delay_ms` after the first, or at once for fsync and unmount). A change whose base
//!    is no longer the branch's version (the branch moved while the file was open) is merged
//!    with it first.
//! 2. **Push** when the branch has commits the remote lacks. A refusal (not a fast-forward)
//!    fetches, merges and tries again with backoff; an unreachable remote is retried with
//!    backoff while commits accumulate.
//! 3. **Fetch** on another node's notice (NATS), on the interval, and before merging.
//! 4. **Install** what the branch has and the tree does not, through the core, skipping paths
//!    with newer local changes (they merge in the next cycle).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant, SystemTime};

use git2::build::TreeUpdateBuilder;
use git2::{Oid, Tree};

use super::remote::{Pushed, Remote};
use super::repo::{Entry, EntryKind, Repo, MAIN, ORIGIN, TREE};
use super::{GitSettings, Pending, Quarantined, Shared, DELETED};
use crate::hlc::{Clock, Stamp};
use crate::merge::{self, Side};
use crate::nats::Nats;
use crate::policy::{PolicyTable, TierKind, POLICY_FILE};
use crate::tier::{space, RemoteChange, RemoteSink, Revision};

/// What tier calls ask of the worker.
pub(crate) enum Cmd {
    /// A local change was recorded.
    Dirty,
    /// A local change was fsynced: commit without waiting for quiet, then answer.
    CommitNow(mpsc::Sender<()>),
    /// Another node pushed.
    Fetch,
    /// A lock is about to be released (`fetch: false`: commit and push what is pending) or was
    /// just granted (`fetch: true`: also fetch and install the remote's changes); answered
    /// once the cycle that does it is over.
    Sync {
        /// Also fetch and install.
        fetch: bool,
        /// Answered after the cycle.
        ack: mpsc::Sender<()>,
    },
    /// Unmount: commit, push once, then answer and stop.
    Shutdown(mpsc::Sender<()>),
}

/// One entry of a tree update: a path and its new entry (`None`: removed).
type Edit = (PathBuf, Option<Entry>);

/// One path's part of a commit or a merge: its tree edits and its lines in the message.
struct Planned {
    path: PathBuf,
    edits: Vec<Edit>,
    lines: Vec<String>,
}

/// Pushes tried in one cycle before waiting for the next.
const PUSH_ATTEMPTS: u32 = 6;
/// Local commits between two `git gc --auto` runs.
const GC_EVERY: u32 = 500;

/// Sets libgit2's network timeouts once: an unreachable remote must not stall the worker.
pub(crate) fn set_timeouts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: process-wide libgit2 options, set before any network operation.
        unsafe {
            let _ = git2::opts::set_server_connect_timeout_in_milliseconds(10_000);
            let _ = git2::opts::set_server_timeout_in_milliseconds(30_000);
        }
    });
}

/// The NATS subject other nodes' push notices arrive on: one per remote.
pub(crate) fn notice_subject(remote: &Remote) -> String {
    super::notice_subject_for(&remote.shown)
}

/// The notice subject of a remote URL (without credentials).
pub(crate) fn subject_of(url: &str) -> String {
    let url = url.trim_start_matches("file://").trim_end_matches('/');
    let url = url.strip_suffix(".git").unwrap_or(url);
    let mut hash: u64 = 0xcbf29ce484222325;
    for b in url.bytes() {
        hash = (hash ^ b as u64).wrapping_mul(0x100000001b3);
    }
    format!("syncfs.git.{hash:016x}")
}

/// The node of the latest commit on the branch that changed `path` (looking back a few
/// hundred commits).
pub(crate) fn last_writer(repo: &Repo, path: &Path) -> Option<String> {
    let main = repo.target(MAIN)?;
    let mut walk = repo.git.revwalk().ok()?;
    walk.push(main).ok()?;
    for id in walk.take(500) {
        let commit = repo.git.find_commit(id.ok()?).ok()?;
        if commit.parent_count() > 1 {
            continue;
        }
        let tree = commit.tree().ok()?;
        let parent = commit.parent(0).ok().and_then(|p| p.tree().ok());
        if Repo::entry_at(Some(&tree), path) != Repo::entry_at(parent.as_ref(), path) {
            return Some(Repo::node_of(&commit));
        }
    }
    None
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// The git thread's state.
pub(crate) struct Worker {
    shared: Arc<Shared>,
    repo: Repo,
    remote: Option<Remote>,
    rx: mpsc::Receiver<Cmd>,
    quiet: Duration,
    max_delay: Duration,
    fetch_interval: Duration,
    clock: Clock,
    nats: Option<Arc<Nats>>,
    rt: tokio::runtime::Handle,
    sink: Option<Arc<dyn RemoteSink>>,
    commits_since_gc: u32,
    /// The branch commit whose conflict files `info` lists.
    conflicts_of: Option<Oid>,
}

impl Worker {
    pub(crate) fn new(
        shared: Arc<Shared>,
        repo: Repo,
        remote: Option<Remote>,
        settings: &GitSettings,
        rx: mpsc::Receiver<Cmd>,
        nats: Option<Arc<Nats>>,
        rt: tokio::runtime::Handle,
    ) -> Worker {
        set_timeouts();
        Worker {
            clock: Clock::new(&shared.node),
            shared,
            repo,
            remote,
            rx,
            quiet: settings.quiet,
            max_delay: settings.max_delay,
            fetch_interval: settings.fetch_interval,
            nats,
            rt,
            sink: None,
            commits_since_gc: 0,
            conflicts_of: None,
        }
    }

    /// Starts the thread.
    pub(crate) fn spawn(mut self, sink: Arc<dyn RemoteSink>) {
        self.sink = Some(sink);
        let spawned = std::thread::Builder::new().name("syncfs-git".into()).spawn(move || self.run());
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the git thread; durable changes stay uncommitted");
        }
    }

    fn run(mut self) {
        if let Some(tip) = self.repo.target(MAIN) {
            self.observe(tip);
        }
        let start = Instant::now();
        let recovering = !self.shared.state.lock().pending.is_empty();
        // (first change, last change) of the changes waiting for their commit.
        let mut dirty: Option<(Instant, Instant)> = recovering.then_some((start, start));
        let mut commit_now = recovering;
        let mut fetch_at = start;
        let mut push = self.ahead();
        let mut retry_at: Option<Instant> = None;
        let mut backoff = Duration::from_millis(500);
        let mut shutdown: Option<mpsc::Sender<()>> = None;
        // fsyncs waiting for the next commit.
        let mut waiting: Vec<mpsc::Sender<()>> = Vec::new();
        // Lock calls waiting for a whole cycle (commit, push, fetch, install).
        let mut syncs: Vec<mpsc::Sender<()>> = Vec::new();
        loop {
            let now = Instant::now();
            if let Some((first, last)) = dirty {
                if commit_now || shutdown.is_some() || now >= last + self.quiet || now >= first + self.max_delay {
                    commit_now = false;
                    match self.commit_local() {
                        Ok(made) => {
                            dirty = None;
                            push |= made;
                            for ack in waiting.drain(..) {
                                let _ = ack.send(());
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cannot commit the pending changes; retrying after the quiet period");
                            dirty = Some((now, now));
                            if self.disk_full(&e) {
                                // The changes are in the tree (synced) and committed when
                                // space returns: fsync need not wait 30 s to learn that.
                                for ack in waiting.drain(..) {
                                    let _ = ack.send(());
                                }
                            }
                        }
                    }
                }
            }
            if self.remote.is_some() {
                let fetch = now >= fetch_at && shutdown.is_none();
                let due = (push || fetch) && (retry_at.is_none_or(|t| now >= t) || shutdown.is_some());
                if due {
                    match self.sync_remote(fetch) {
                        Ok(()) => {
                            push = false;
                            retry_at = None;
                            backoff = Duration::from_millis(500);
                            self.shared.info.lock().error = None;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, retry_in = ?backoff, "the git remote is not reachable; commits stay on this node");
                            self.shared.info.lock().error = Some(e);
                            retry_at = Some(now + backoff);
                            backoff = (backoff * 2).min(Duration::from_secs(60));
                            push = self.ahead();
                        }
                    }
                    if fetch {
                        fetch_at = now + self.fetch_interval;
                    }
                }
            }
            // Status first: by the time a conflict file shows in the tree, status lists it
            // (a program that sees the file and then asks must not get an older list).
            self.update_info();
            self.apply_to_tree();
            for ack in syncs.drain(..) {
                let _ = ack.send(());
            }
            {
                let (lock, cond) = &self.shared.ready;
                let mut ready = lock.lock();
                if !*ready {
                    *ready = true;
                    cond.notify_all();
                }
            }
            if let Some(ack) = shutdown.take() {
                let _ = ack.send(());
                return;
            }

            let mut wake = now + Duration::from_secs(3600);
            if self.remote.is_some() {
                wake = wake.min(fetch_at.max(retry_at.unwrap_or(fetch_at)));
                if push {
                    wake = wake.min(retry_at.unwrap_or(now));
                }
            }
            if let Some((first, last)) = dirty {
                wake = wake.min((last + self.quiet).min(first + self.max_delay));
            }
            let first = match self.rx.recv_timeout(wake.saturating_duration_since(Instant::now())) {
                Ok(cmd) => Some(cmd),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let rx = &self.rx;
            for cmd in first.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
                let now = Instant::now();
                match cmd {
                    Cmd::Dirty => dirty = Some(dirty.map_or((now, now), |(f, _)| (f, now))),
                    Cmd::CommitNow(ack) => {
                        dirty = Some(dirty.map_or((now, now), |(f, _)| (f, now)));
                        commit_now = true;
                        waiting.push(ack);
                    }
                    Cmd::Fetch => {
                        fetch_at = now;
                        retry_at = None;
                    }
                    Cmd::Sync { fetch, ack } => {
                        if !self.shared.state.lock().pending.is_empty() {
                            dirty = Some(dirty.map_or((now, now), |(f, _)| (f, now)));
                            commit_now = true;
                        }
                        if fetch {
                            fetch_at = now;
                        }
                        push |= self.ahead();
                        retry_at = None;
                        syncs.push(ack);
                    }
                    Cmd::Shutdown(ack) => {
                        if !self.shared.state.lock().pending.is_empty() {
                            dirty = Some(dirty.unwrap_or((now, now)));
                        }
                        shutdown = Some(ack);
                    }
                }
            }
        }
    }

    fn sink(&self) -> &Arc<dyn RemoteSink> {
        self.sink.as_ref().expect("the worker runs only after start")
    }

    /// Moves the clock past a commit's stamp.
    fn observe(&self, commit: Oid) {
        if let Ok(c) = self.repo.git.find_commit(commit) {
            self.clock.observe(&Repo::stamp_of(&c));
        }
    }

    /// Whether the branch has commits the remote lacks.
    fn ahead(&self) -> bool {
        if self.remote.is_none() {
            return false;
        }
        match (self.repo.target(MAIN), self.repo.target(ORIGIN)) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(main), Some(origin)) => !self.repo.contains(origin, main),
        }
    }

    /// Merges one path both sides changed; checks a merged result against the path's schema.
    /// A symlink on either side is never merged as text: the newer side wins, the other is
    /// kept as a conflict file.
    fn merge_path(&self, path: &Path, base: Option<Oid>, ours: Side<'_>, theirs: Side<'_>, links: bool) -> Result<merge::Outcome, git2::Error> {
        let policy = self.shared.policies.resolve(path);
        let base = base.map(|b| self.repo.read_blob(b)).transpose()?;
        let mut outcome = if links {
            merge::keep_newer(ours, theirs, "a symbolic link changed on both sides")
        } else {
            merge::merge_file(path, policy.consistency, &policy.merge_rules, base.as_deref(), ours, theirs)
        };
        if let Some(content) = &outcome.content {
            let merged = Some(content.as_slice()) != ours.content && Some(content.as_slice()) != theirs.content;
            if merged {
                if let Err(reason) = self.sink().validate(path, content) {
                    tracing::warn!(path = %path.display(), %reason, "the merged document breaks its schema: keeping both versions as a conflict");
                    outcome = merge::keep_newer(ours, theirs, &format!("the merged result {reason}"));
                }
            }
        }
        if let Some(c) = &outcome.conflict {
            tracing::warn!(
                path = %path.display(),
                kept = %merge::conflict_path(path, &c.loser_stamp).display(),
                fields = %c.fields.join(", "),
                "conflict: the newer version stays, the other is kept beside it"
            );
        }
        Ok(outcome)
    }

    /// The tree edits of a merge outcome at `path`, and the conflict file's path, if any.
    /// `present`: the path is in the tree the edits apply to. The result takes the kind of
    /// the side whose content it is (ours for a merged result).
    fn outcome_edits(&self, path: &Path, outcome: &merge::Outcome, present: bool, ours: Option<Entry>, theirs: Option<Entry>) -> Result<(Vec<Edit>, Option<PathBuf>), git2::Error> {
        let mut edits = Vec::new();
        match &outcome.content {
            Some(content) => {
                let blob = self.repo.git.blob(content)?;
                let kind = [ours, theirs]
                    .into_iter()
                    .flatten()
                    .find(|e| e.blob == blob)
                    .or(ours)
                    .or(theirs)
                    .map_or(EntryKind::File, |e| e.kind);
                // A merged text is a file, even where one side was a link.
                let kind = if kind == EntryKind::Link && ![ours, theirs].iter().flatten().any(|e| e.blob == blob) { EntryKind::File } else { kind };
                edits.push((path.to_path_buf(), Some(Entry { blob, kind })));
            }
            None if present => edits.push((path.to_path_buf(), None)),
            None => {}
        }
        let Some(conflict) = &outcome.conflict else { return Ok((edits, None)) };
        let at = merge::conflict_path(path, &conflict.loser_stamp);
        let blob = self.repo.git.blob(&merge::conflict_content(path, conflict))?;
        edits.push((at.clone(), Some(Entry::file(blob))));
        Ok((edits, Some(at)))
    }

    /// `base` with `edits` applied.
    /// Whether `e` is (or happened on) a full disk: then no change is to blame, and none is
    /// quarantined; the commit is retried until space returns.
    fn disk_full(&self, e: &git2::Error) -> bool {
        space::git_is_full(e) || space::short_of(self.repo.git.path(), space::GIT_MARGIN)
    }

    fn updated_tree(&self, base: &Tree<'_>, edits: &[Edit]) -> Result<Oid, git2::Error> {
        let mut update = TreeUpdateBuilder::new();
        for (path, entry) in edits {
            match entry {
                Some(e) => update.upsert(path, e.blob, e.kind.mode()),
                None => update.remove(path),
            };
        }
        update.create_updated(&self.repo.git, base)
    }

    /// `base` with every path's edits applied. When they do not apply together (libgit2
    /// refuses a name, or a file meets a directory), applies them path by path and leaves out
    /// each path whose edits fail: one entry must not stop every commit. Returns the tree, the
    /// paths applied, and those left out with why.
    fn apply_edits(&self, base: &Tree<'_>, planned: Vec<Planned>) -> Result<(Oid, Vec<Planned>, Vec<(PathBuf, String)>), git2::Error> {
        let all: Vec<Edit> = planned.iter().flat_map(|p| p.edits.iter().cloned()).collect();
        match self.updated_tree(base, &all) {
            Ok(tree) => return Ok((tree, planned, Vec::new())),
            // Not the entries' fault: the whole commit waits for space.
            Err(e) if self.disk_full(&e) => return Err(e),
            Err(_) => {}
        }
        let mut tree = base.id();
        let (mut kept, mut failed) = (Vec::new(), Vec::new());
        for p in planned {
            let current = self.repo.git.find_tree(tree)?;
            match self.updated_tree(&current, &p.edits) {
                Ok(t) => {
                    tree = t;
                    kept.push(p);
                }
                Err(e) if self.disk_full(&e) => return Err(e),
                Err(e) => failed.push((p.path, format!("git refuses the change: {}", e.message()))),
            }
        }
        Ok((tree, kept, failed))
    }

    /// What committing one pending change writes: the change itself, or its merge with the
    /// branch's version when the branch moved since the writer started. `None`: nothing.
    fn plan_local(&self, path: &Path, change: &Pending, head: Option<Oid>, head_tree: Option<&Tree<'_>>, stamp: &Stamp, local_label: &str) -> Result<Option<Planned>, git2::Error> {
        let on_branch = Repo::entry_at(head_tree, path);
        if on_branch.map(|e| e.blob) == change.base || on_branch == change.blob {
            let edit = match (change.blob, on_branch) {
                (Some(blob), _) => (path.to_path_buf(), Some(blob)),
                (None, Some(_)) => (path.to_path_buf(), None),
                // Made and removed between two commits: nothing to record.
                (None, None) => return Ok(None),
            };
            let line = format!("{} {}", if change.blob.is_some() { "M" } else { "D" }, path.display());
            return Ok(Some(Planned { path: path.to_path_buf(), edits: vec![edit], lines: vec![line] }));
        }
        // The branch moved since the writer opened the file: merge with it.
        let paths: HashSet<PathBuf> = [path.to_path_buf()].into();
        let theirs_at = match head {
            Some(h) => self.repo.last_changes(h, None, &paths)?.remove(path),
            None => None,
        };
        let (theirs_stamp, theirs_commit) = theirs_at.unwrap_or_else(|| (stamp.clone(), Oid::ZERO_SHA1));
        let ours_content = change.blob.map(|e| self.repo.read_blob(e.blob)).transpose()?;
        let theirs_content = on_branch.map(|e| self.repo.read_blob(e.blob)).transpose()?;
        let theirs_label = theirs_commit.to_string();
        let links = [change.blob, on_branch].iter().flatten().any(|e| e.kind == EntryKind::Link);
        let outcome = self.merge_path(
            path,
            change.base,
            Side { content: ours_content.as_deref(), stamp, commit: local_label },
            Side { content: theirs_content.as_deref(), stamp: &theirs_stamp, commit: &theirs_label },
            links,
        )?;
        let (edits, conflict) = self.outcome_edits(path, &outcome, on_branch.is_some(), change.blob, on_branch)?;
        let mut lines = vec![format!("merged {}", path.display())];
        if let Some(c) = conflict {
            lines.push(format!("conflict {}", c.display()));
        }
        Ok(Some(Planned { path: path.to_path_buf(), edits, lines }))
    }

    /// Commits the pending changes on the branch. Returns whether a commit was made. A change
    /// git refuses (its name, or a tree update it breaks) is left out and quarantined: the
    /// file stays in the tree, `status` lists it, and the others are committed.
    fn commit_local(&mut self) -> Result<bool, git2::Error> {
        let snapshot: BTreeMap<PathBuf, Pending> = self.shared.state.lock().pending.clone();
        if snapshot.is_empty() {
            return Ok(false);
        }
        let head = self.repo.target(MAIN);
        let head_tree = self.repo.tree_of(head)?;
        let stamp = self.clock.now();
        let local_label = format!("uncommitted change on {}", self.shared.node);
        let mut planned = Vec::new();
        let mut refused: Vec<(PathBuf, String)> = Vec::new();
        for (path, change) in &snapshot {
            if let Some(why) = super::names::refusal(path) {
                refused.push((path.clone(), why));
                continue;
            }
            match self.plan_local(path, change, head, head_tree.as_ref(), &stamp, &local_label) {
                Ok(Some(p)) => planned.push(p),
                Ok(None) => {}
                Err(e) if self.disk_full(&e) => return Err(e),
                Err(e) => refused.push((path.clone(), format!("cannot commit it: {}", e.message()))),
            }
        }
        let empty = self.repo.empty_tree()?;
        let base_tree = head_tree.as_ref().unwrap_or(&empty);
        let (new_tree, kept, failed) = self.apply_edits(base_tree, planned)?;
        refused.extend(failed);
        let made = new_tree != base_tree.id() || (head.is_none() && refused.is_empty());
        let made = if made {
            let n = snapshot.len() - refused.len();
            let summary = format!("syncfs: {n} change{} on {}", if n == 1 { "" } else { "s" }, self.shared.node);
            let body = kept.iter().flat_map(|p| p.lines.iter()).take(50).cloned().collect::<Vec<_>>().join("\n");
            let parents: Vec<Oid> = head.into_iter().collect();
            let commit = self.repo.write_commit(new_tree, &parents, &summary, &body, &stamp)?;
            self.repo.set_ref(MAIN, commit, head, "syncfs: commit")?;
            // Counted as unpushed before it stops counting as uncommitted: status never shows a
            // moment where the change is neither.
            self.count_unpushed();
            tracing::debug!(%commit, changes = n, "committed");
            self.commits_since_gc += 1;
            true
        } else {
            false
        };
        let refused: HashMap<PathBuf, String> = refused.into_iter().collect();
        let mut st = self.shared.state.lock();
        for (path, change) in snapshot {
            let why = refused.get(&path);
            match st.pending.get_mut(&path) {
                Some(current) if current.gen == change.gen => {
                    st.pending.remove(&path);
                    if let Some(why) = why {
                        tracing::warn!(path = %path.display(), reason = %why, "a change git refuses: kept on this node, not committed");
                        st.quarantined.insert(path, format!("{why}: kept on this node, not committed"));
                    }
                }
                // Changed again meanwhile: that change was made on this one (when it was
                // committed; otherwise the next one is made on what the branch has).
                Some(current) => {
                    if why.is_none() {
                        current.base = change.blob.map(|e| e.blob);
                    }
                }
                None => {}
            }
        }
        drop(st);
        if self.commits_since_gc >= GC_EVERY {
            self.commits_since_gc = 0;
            let status = std::process::Command::new("git")
                .arg("--git-dir")
                .arg(self.repo.git.path())
                .args(["gc", "--auto", "--quiet"])
                .status();
            if let Err(e) = status {
                tracing::debug!(error = %e, "git gc --auto did not run");
            }
        }
        Ok(made)
    }

    /// Fetches (if asked), merges, and pushes until the remote has the branch.
    fn sync_remote(&mut self, fetch: bool) -> Result<(), String> {
        let remote = self.remote.clone().expect("called with a remote");
        if fetch {
            remote.fetch(&self.repo.git)?;
            self.shared.info.lock().last_pull = Some(now_rfc3339());
            self.integrate().map_err(|e| format!("merging the remote's branch: {e}"))?;
        }
        for attempt in 0..PUSH_ATTEMPTS {
            if !self.ahead() {
                break;
            }
            match remote.push(&self.repo.git)? {
                Pushed::Done => {
                    let main = self.repo.target(MAIN).expect("ahead means a branch");
                    // The remote has it now; an anonymous push does not move the tracking ref.
                    let _ = self.repo.git.reference(ORIGIN, main, true, "syncfs: pushed");
                    self.shared.info.lock().last_push = Some(now_rfc3339());
                    tracing::debug!(commit = %main, "pushed");
                    self.notify(main);
                    return Ok(());
                }
                Pushed::Rejected(why) => {
                    tracing::debug!(%why, attempt, "push refused: fetching and merging first");
                    if attempt + 1 == PUSH_ATTEMPTS {
                        return Err(format!("push refused {PUSH_ATTEMPTS} times (the remote keeps moving): {why}"));
                    }
                    let jitter = (SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0) % 50) as u64;
                    std::thread::sleep(Duration::from_millis(25 * (1 << attempt) + jitter));
                    remote.fetch(&self.repo.git)?;
                    self.shared.info.lock().last_pull = Some(now_rfc3339());
                    self.integrate().map_err(|e| format!("merging the remote's branch: {e}"))?;
                }
            }
        }
        Ok(())
    }

    /// Tells other nodes that the remote moved.
    fn notify(&self, commit: Oid) {
        let (Some(nats), Some(remote)) = (&self.nats, &self.remote) else { return };
        let client = nats.client.clone();
        let subject = notice_subject(remote);
        let payload = format!("{} {commit}", self.shared.node);
        self.rt.spawn(async move {
            if client.publish(subject, payload.into()).await.is_ok() {
                let _ = client.flush().await;
            }
        });
    }

    /// Brings the remote's branch into ours: fast-forward, or an in-memory merge.
    fn integrate(&mut self) -> Result<(), git2::Error> {
        let Some(origin) = self.repo.target(ORIGIN) else { return Ok(()) };
        self.observe(origin);
        let Some(main) = self.repo.target(MAIN) else {
            return self.repo.set_ref(MAIN, origin, None, "syncfs: the remote's branch");
        };
        if self.repo.contains(main, origin) {
            return Ok(());
        }
        if self.repo.contains(origin, main) {
            return self.repo.set_ref(MAIN, origin, Some(main), "syncfs: fast-forward");
        }
        let base = self.repo.git.merge_base(main, origin).ok();
        let base_tree = self.repo.tree_of(base)?;
        let ours_tree = self.repo.tree_of(Some(main))?.expect("a commit has a tree");
        let theirs_tree = self.repo.tree_of(Some(origin))?.expect("a commit has a tree");
        let ours: BTreeMap<PathBuf, Option<Entry>> = self.repo.changes(base_tree.as_ref(), Some(&ours_tree))?.into_iter().collect();
        let theirs: BTreeMap<PathBuf, Option<Entry>> = self.repo.changes(base_tree.as_ref(), Some(&theirs_tree))?.into_iter().collect();
        let both: HashSet<PathBuf> = theirs
            .iter()
            .filter(|(p, t)| ours.get(*p).is_some_and(|o| o != *t))
            .map(|(p, _)| p.clone())
            .collect();
        let ours_at = self.repo.last_changes(main, base, &both)?;
        let theirs_at = self.repo.last_changes(origin, base, &both)?;
        // Built on theirs: entries git refuses in names (pushed with plain git) are carried over
        // as they are, since a tree update only checks the names it writes.
        let mut planned = Vec::new();
        for (path, o) in &ours {
            // No tree update can write a name git refuses: the remote's version stays.
            if !super::storable(path) {
                continue;
            }
            let Some(t) = theirs.get(path) else {
                // Only ours changed it; theirs still has the base's version, if any.
                let edit = match o {
                    Some(entry) => (path.clone(), Some(*entry)),
                    None if Repo::entry_at(Some(&theirs_tree), path).is_some() => (path.clone(), None),
                    None => continue,
                };
                planned.push(Planned { path: path.clone(), edits: vec![edit], lines: Vec::new() });
                continue;
            };
            if !both.contains(path) {
                continue;
            }
            let (os, oc) = &ours_at[path];
            let (ts, tc) = &theirs_at[path];
            let ours_content = o.map(|e| self.repo.read_blob(e.blob)).transpose()?;
            let theirs_content = t.map(|e| self.repo.read_blob(e.blob)).transpose()?;
            let (oc, tc) = (oc.to_string(), tc.to_string());
            let links = [*o, *t].iter().flatten().any(|e| e.kind == EntryKind::Link);
            let outcome = self.merge_path(
                path,
                base_tree.as_ref().and_then(|bt| Repo::entry_at(Some(bt), path)).map(|e| e.blob),
                Side { content: ours_content.as_deref(), stamp: os, commit: &oc },
                Side { content: theirs_content.as_deref(), stamp: ts, commit: &tc },
                links,
            )?;
            let (edits, conflict) = self.outcome_edits(path, &outcome, t.is_some(), *o, *t)?;
            let mut lines = vec![format!("merged {}", path.display())];
            if let Some(c) = conflict {
                lines.push(format!("conflict {}", c.display()));
            }
            planned.push(Planned { path: path.clone(), edits, lines });
        }
        let (merged, kept, failed) = self.apply_edits(&theirs_tree, planned)?;
        if !failed.is_empty() {
            let mut st = self.shared.state.lock();
            for (path, why) in failed {
                tracing::warn!(path = %path.display(), reason = %why, "merging the remote's branch: this node's version does not fit; the remote's stays");
                st.quarantined.insert(path, format!("{why}: merging the remote's branch kept the remote's version (this node's is in its history)"));
            }
        }
        let lines: Vec<String> = kept.into_iter().flat_map(|p| p.lines).collect();
        if merged == theirs_tree.id() {
            // Nothing of ours is missing from theirs. If every commit only we have is a merge
            // (the other side of a merge both nodes made at once), take theirs as it is.
            let only_ours = self.repo.commits_between(main, Some(origin))?;
            let all_merges = only_ours
                .iter()
                .all(|c| self.repo.git.find_commit(*c).map(|c| c.parent_count() > 1).unwrap_or(false));
            if all_merges {
                return self.repo.set_ref(MAIN, origin, Some(main), "syncfs: fast-forward over an equal merge");
            }
        }
        let stamp = self.clock.now();
        let summary = format!("syncfs: merge the remote's branch on {}", self.shared.node);
        let body = lines.iter().take(50).cloned().collect::<Vec<_>>().join("\n");
        let commit = self.repo.write_commit(merged, &[main, origin], &summary, &body, &stamp)?;
        self.repo.set_ref(MAIN, commit, Some(main), "syncfs: merge")?;
        self.count_unpushed();
        tracing::debug!(%commit, paths = both.len(), "merged the remote's branch");
        Ok(())
    }

    /// Installs into the tree what the branch has and the tree does not.
    fn apply_to_tree(&mut self) {
        let Some(main) = self.repo.target(MAIN) else { return };
        let synced = self.repo.target(TREE);
        if synced == Some(main) {
            return;
        }
        let result = (|| -> Result<(), git2::Error> {
            let old = self.repo.tree_of(synced)?;
            let new = self.repo.tree_of(Some(main))?;
            let changes = self.repo.changes(old.as_ref(), new.as_ref())?;
            let writers = match synced {
                Some(s) if !changes.is_empty() => {
                    let paths: HashSet<PathBuf> = changes.iter().map(|(p, _)| p.clone()).collect();
                    self.repo.last_changes(main, Some(s), &paths).unwrap_or_default()
                }
                _ => Default::default(),
            };
            let mut gone_dirs: Vec<PathBuf> = Vec::new();
            for (path, blob) in &changes {
                if self.shared.policies.resolve(path).tier != TierKind::Git || !super::storable(path) {
                    tracing::debug!(path = %path.display(), "the branch has a path this node does not keep in git; not installed");
                    continue;
                }
                {
                    let mut st = self.shared.state.lock();
                    if let Some((stamp, _)) = writers.get(path) {
                        st.writers.insert(path.clone(), stamp.node.clone());
                    }
                    // Already there, about to be installed by the core (a local commit just
                    // made), or changed again locally (merged in the next cycle).
                    let installing = blob.is_some() && st.local.get(path).map(|(b, _)| b) == blob.as_ref();
                    if st.held.get(path) == blob.as_ref() || installing || st.pending.contains_key(path) {
                        continue;
                    }
                    st.applying.insert(path.clone(), *blob);
                }
                let (change, rev) = match blob {
                    Some(e) => match self.installable(path, e.blob) {
                        Ok(bytes) => {
                            let change = match e.kind {
                                EntryKind::Link => RemoteChange::Symlink(bytes),
                                kind => RemoteChange::Program { bytes, executable: kind == EntryKind::Exec },
                            };
                            (change, Revision(e.blob.to_string()))
                        }
                        Err(why) => {
                            // One path's version must not hold up the others'.
                            tracing::warn!(path = %path.display(), reason = %why, "the branch's version is not installed");
                            self.shared.state.lock().applying.remove(path);
                            continue;
                        }
                    },
                    None => {
                        if let Some(parent) = path.parent() {
                            gone_dirs.push(parent.to_path_buf());
                        }
                        (RemoteChange::Delete, Revision(DELETED.into()))
                    }
                };
                if let Err(e) = self.sink().apply(path, change, Some(rev)) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot install the branch's version");
                }
                self.shared.state.lock().applying.remove(path);
            }
            // Directories the branch no longer has anything in go too, if they are empty.
            let mut dirs: Vec<PathBuf> = Vec::new();
            for dir in gone_dirs {
                let mut d = dir.as_path();
                while !d.as_os_str().is_empty() {
                    dirs.push(d.to_path_buf());
                    d = d.parent().unwrap_or(Path::new(""));
                }
            }
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            dirs.dedup();
            for dir in dirs {
                let still = new.as_ref().is_some_and(|t| t.get_path(&dir).is_ok());
                if !still {
                    let _ = self.sink().apply(&dir, RemoteChange::PruneDir, None);
                }
            }
            self.repo.git.reference(TREE, main, true, "syncfs: tree updated")?;
            Ok(())
        })();
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot install the branch's changes into the tree; retrying next cycle");
        }
    }

    /// The content of the branch's version of `path`, if the tree may take it. The policy
    /// table must be valid: a broken one (pushed with plain git) would keep every node from
    /// mounting, so the node keeps its last valid table and `status` says why.
    fn installable(&self, path: &Path, blob: Oid) -> Result<Vec<u8>, String> {
        let bytes = self.repo.read_blob(blob).map_err(|e| e.message().to_string())?;
        if path == Path::new(POLICY_FILE) {
            PolicyTable::check_file(&bytes).map_err(|why| format!("not a valid policy table ({why}); this node keeps its last valid one"))?;
        }
        Ok(bytes)
    }

    /// Why the branch's policy table (in `tree`) is not installed, if it is not a valid one.
    fn table_error(&self, tree: Option<&Tree<'_>>) -> Option<String> {
        if self.shared.policies.resolve(POLICY_FILE).tier != TierKind::Git {
            return None;
        }
        let blob = Repo::blob_at(tree, Path::new(POLICY_FILE))?;
        let why = PolicyTable::check_file(&self.repo.read_blob(blob).ok()?).err()?;
        Some(format!(
            "the branch's {POLICY_FILE} (blob {:.12}) is not a valid table: {why}; this node keeps its last valid table until the remote has a valid one",
            blob.to_string()
        ))
    }

    /// Commits on the branch the remote lacks, for status.
    fn unpushed(&self) -> u64 {
        match (self.remote.is_some(), self.repo.target(MAIN)) {
            (true, Some(m)) => self.repo.commits_between(m, self.repo.target(ORIGIN)).map(|c| c.len() as u64).unwrap_or(0),
            _ => 0,
        }
    }

    fn count_unpushed(&self) {
        let n = self.unpushed();
        self.shared.info.lock().unpushed = n;
    }

    /// Refreshes what `syncfs status` shows.
    fn update_info(&mut self) {
        let main = self.repo.target(MAIN);
        let unpushed = self.unpushed();
        let listed = if main != self.conflicts_of {
            self.conflicts_of = main;
            let tree = self.repo.tree_of(main).ok().flatten();
            let files = tree.as_ref().map(Repo::files).unwrap_or_default();
            let mut conflicts: Vec<String> = files
                .keys()
                .filter(|p| merge::is_conflict_file(p))
                .map(|p| p.display().to_string())
                .collect();
            conflicts.sort();
            // What the branch holds that no node can install (see `apply_to_tree`).
            let mut refused: Vec<Quarantined> = files
                .keys()
                .filter_map(|p| {
                    let why = super::names::refusal(p)?;
                    Some(Quarantined {
                        path: p.display().to_string(),
                        reason: format!("{why}: in the branch, not installed on this node; rename or remove it in the remote"),
                    })
                })
                .collect();
            refused.sort();
            Some((conflicts, refused, self.table_error(tree.as_ref())))
        } else {
            None
        };
        let mut info = self.shared.info.lock();
        info.head = main.map(|m| m.to_string());
        info.unpushed = unpushed;
        if let Some((conflicts, refused, table_error)) = listed {
            info.conflicts = conflicts;
            info.quarantined = refused;
            info.policy_error = table_error;
        }
    }
}
