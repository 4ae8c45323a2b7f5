//! The durable tier: git (`tier: git`).
//!
//! # Where things are
//!
//! - A bare repository per node under `--state/git` ([`repo`]). There is no working tree to
//!   race with FUSE writes: the core serves the materialized tree, and each durable path knows
//!   the blob the tree holds for it ([`Tier::revision`], `user.syncfs.rev`).
//! - A close (or fsync) of a durable file writes its content as a blob at once and records the
//!   change as *pending*: the blob, and the blob the writer started from (the merge base).
//! - One thread per mount owns every ref move ([`worker`]). After a quiet period (`git.quiet_ms`,
//!   1.5 s; at most `git.max_delay_ms`, 30 s, after the first change) and at fsync and unmount it
//!   commits the pending changes with the node id and a hybrid-clock stamp as trailers, pushes
//!   to the remote (never forcing; a refused push fetches, merges and retries with backoff),
//!   fetches on a NATS notice from another node's push or on an interval, merges, and brings
//!   the tree up to date through the core.
//! - Merges happen in memory ([`crate::merge`]): a path one side changed takes that side; a
//!   path both changed merges by its policy, field by field for `merge` YAML/JSON/TOML; what
//!   cannot be merged keeps the newer version in place and the older beside it as a conflict
//!   file, committed like any other file.
//!
//! - Past versions are readable in `.syncfs/history/<path>/` ([`history`]).
//!
//! # Crash safety
//!
//! A close that returned has its content in the tree. The ref [`repo::TREE`] names the commit
//! the tree matches except for pending changes, so the next mount finds every change the
//! daemon had not committed by comparing the tree with it, and commits them first.

mod history;
mod intents;
mod names;
mod remote;
pub mod repo;
mod worker;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use git2::Oid;
use parking_lot::Mutex;

use self::remote::Remote;
use self::repo::{Entry, EntryKind, Repo};
use self::worker::{Cmd, Worker};
use super::{space, RemoteSink, Revision, Target, Tier, TierError, WriteMode};
use crate::fs::Kind;
use crate::nats::{Nats, Secret};
use crate::op::Op;
use crate::policy::{Consistency, MergeRule, PolicyTable, TierKind, POLICY_FILE};

/// How long a lock's release waits for its push, and its grant for the fetch.
const LOCK_SYNC_WAIT: Duration = Duration::from_secs(10);

/// The largest document whose immutable fields are checked at write time.
const MAX_CHECKED_SIZE: u64 = 16 << 20;

/// How the durable tier reaches its remote, and how often it commits and fetches.
#[derive(Debug, Clone, PartialEq)]
pub struct GitSettings {
    /// The shared remote (a path, `file://`, `ssh://`, `https://` URL); none: local git only.
    pub remote: Option<String>,
    /// How long after the last change the pending changes are committed.
    pub quiet: Duration,
    /// The longest a change waits for its commit while changes keep coming.
    pub max_delay: Duration,
    /// How often the remote is fetched without a notice from another node.
    pub fetch_interval: Duration,
    /// The largest file committed (larger ones get `EFBIG`): git keeps every version of every
    /// file on every node, so large content belongs in the blob tier.
    pub max_file_bytes: u64,
    /// User name for https (and ssh) remotes.
    pub username: Option<String>,
    /// Password or token for https remotes.
    pub password: Option<Secret>,
    /// A private key file for ssh remotes (else the ssh agent).
    pub ssh_key: Option<PathBuf>,
    /// The key's passphrase.
    pub ssh_passphrase: Option<Secret>,
}

impl Default for GitSettings {
    fn default() -> Self {
        GitSettings {
            remote: None,
            quiet: Duration::from_millis(1500),
            max_delay: Duration::from_secs(30),
            fetch_interval: Duration::from_secs(10),
            max_file_bytes: 1 << 30,
            username: None,
            password: None,
            ssh_key: None,
            ssh_passphrase: None,
        }
    }
}

impl GitSettings {
    /// Fills credentials the config file left out from the environment.
    pub fn with_env(mut self) -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if self.username.is_none() {
            self.username = var("SYNCFS_GIT_USERNAME");
        }
        if self.password.is_none() {
            self.password = var("SYNCFS_GIT_PASSWORD").map(Secret);
        }
        if self.ssh_key.is_none() {
            self.ssh_key = var("SYNCFS_GIT_SSH_KEY").map(PathBuf::from);
        }
        if self.ssh_passphrase.is_none() {
            self.ssh_passphrase = var("SYNCFS_GIT_SSH_PASSPHRASE").map(Secret);
        }
        self
    }
}

/// A local change not committed yet.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pending {
    /// The blob the change was made on: the merge base if the branch moved meanwhile.
    base: Option<Oid>,
    /// The new content and kind; `None`: deleted.
    blob: Option<Entry>,
    /// Orders local changes (see [`State::gen`]).
    gen: u64,
}

/// What the tier knows about paths. One lock; never held across I/O.
#[derive(Debug, Default)]
struct State {
    /// The blob (and kind) the tree holds for each durable file and symlink.
    held: HashMap<PathBuf, Entry>,
    /// Local changes waiting for their commit.
    pending: BTreeMap<PathBuf, Pending>,
    /// Counts local changes; the generation of each is recorded with it.
    gen: u64,
    /// The last local commit per path, until the core installs it.
    local: HashMap<PathBuf, (Entry, u64)>,
    /// For paths the worker updated from the branch: the generation at that moment. A local
    /// install of an older generation is already part of what the worker installed.
    merged_at: HashMap<PathBuf, u64>,
    /// What the worker is installing right now, by path (`None`: a deletion).
    applying: HashMap<PathBuf, Option<Entry>>,
    /// The node that last changed each path, where known.
    writers: HashMap<PathBuf, String>,
    /// Recent changes of `held`, for the base of renames onto a path.
    log: super::revlog::RevisionLog,
    /// Files of this node's tree kept out of its commits, with why: names git refuses, and
    /// changes no tree update could take. The file stays; its next change tries again.
    quarantined: BTreeMap<PathBuf, String>,
}

impl State {
    /// The tree holds `entry` for `path` from now on (`None`: nothing).
    fn hold(&mut self, path: &Path, entry: Option<Entry>) {
        let before = match entry {
            Some(e) => self.held.insert(path.to_path_buf(), e),
            None => self.held.remove(path),
        };
        if before.map(|e| e.blob) != entry.map(|e| e.blob) {
            self.log.changed(path, before.map(|e| revision(e.blob)), std::time::Instant::now());
        }
    }
}

/// What `syncfs status` shows about the durable tier.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GitInfo {
    /// The remote, without credentials.
    pub remote: Option<String>,
    /// Last successful push (RFC 3339).
    pub last_push: Option<String>,
    /// Last successful fetch (RFC 3339).
    pub last_pull: Option<String>,
    /// Commits on this node's branch that the remote does not have.
    pub unpushed: u64,
    /// Local changes not committed yet.
    pub uncommitted: u64,
    /// The branch's commit.
    pub head: Option<String>,
    /// The last error talking to the remote, until an exchange succeeds.
    pub error: Option<String>,
    /// Conflict files in the branch.
    pub conflicts: Vec<String>,
    /// Paths kept out of this node's commits (its own files) or of its tree (the branch's),
    /// because git refuses them, by path.
    pub quarantined: Vec<Quarantined>,
    /// Why the branch's policy table is not installed on this node, while it is not a valid
    /// table: the node keeps its last valid one.
    pub policy_error: Option<String>,
}

/// A path the durable tier keeps out, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Quarantined {
    /// Relative to the sync root.
    pub path: String,
    /// Why, and what fixes it.
    pub reason: String,
}

pub(crate) struct Shared {
    node: String,
    policies: Arc<PolicyTable>,
    tree_dir: PathBuf,
    state: Mutex<State>,
    info: Mutex<GitInfo>,
    /// Blob writes and lookups from tier calls (the worker has its own handle).
    objects: Mutex<Repo>,
    /// Reads for the history view and `user.syncfs.node`, which may walk long histories.
    history: Mutex<Repo>,
    /// The branch commit each directory of the history view was built from.
    views: Mutex<HashMap<PathBuf, Option<Oid>>>,
    tx: Mutex<mpsc::Sender<Cmd>>,
    /// Set once the worker's first cycle (commit, fetch, install) is done.
    ready: (Mutex<bool>, parking_lot::Condvar),
    /// What the tree is about to hold, for the next mount's recovery.
    intents: intents::Intents,
}

impl Shared {
    fn send(&self, cmd: Cmd) {
        let _ = self.tx.lock().send(cmd);
    }

    /// Records a local change of `path` and wakes the worker. With `durable` (fsync), waits
    /// until the change is in a commit on this node's branch.
    fn record(&self, path: &Path, base: Option<Oid>, blob: Option<Entry>, durable: bool) {
        self.intents.note(path, blob.map_or(intents::Intent::Gone, |e| intents::Intent::Holds(e.blob)));
        {
            let mut st = self.state.lock();
            st.gen += 1;
            let gen = st.gen;
            let base = st.pending.get(path).map(|p| p.base).unwrap_or(base);
            st.pending.insert(path.to_path_buf(), Pending { base, blob, gen });
            match blob {
                Some(b) => {
                    st.local.insert(path.to_path_buf(), (b, gen));
                }
                None => {
                    st.hold(path, None);
                    st.local.remove(path);
                }
            }
            st.writers.insert(path.to_path_buf(), self.node.clone());
            st.quarantined.remove(path);
        }
        if !durable {
            self.send(Cmd::Dirty);
            return;
        }
        let (ack, done) = mpsc::channel();
        self.send(Cmd::CommitNow(ack));
        // The change is safe on disk either way (the tree's file is synced by the core); this
        // only bounds how long fsync waits for the commit itself.
        if done.recv_timeout(Duration::from_secs(30)).is_err() {
            tracing::warn!(path = %path.display(), "fsync: the commit did not finish within 30 s; it stays pending");
        }
    }
}

/// The git tier of a mount.
#[derive(Clone)]
pub struct GitTier {
    shared: Arc<Shared>,
    max_file_bytes: u64,
    worker: Arc<Mutex<Option<Worker>>>,
    rt: tokio::runtime::Handle,
    nats: Option<Arc<Nats>>,
    remote: Option<Remote>,
}

impl std::fmt::Debug for GitTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitTier").field("node", &self.shared.node).finish_non_exhaustive()
    }
}

fn backend(e: impl std::fmt::Display) -> TierError {
    TierError::Backend(format!("git: {e}"))
}

/// A libgit2 error: `ENOSPC` when the disk is full (which libgit2 says only in its message).
fn git_error(e: git2::Error) -> TierError {
    if space::git_is_full(&e) {
        return space::no_space(format_args!("git: {e}"));
    }
    backend(e)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, TierError> + Send + 'static) -> Result<T, TierError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TierError::Backend(format!("blocking task: {e}")))?
}

/// Whether git can store a path: no component git refuses as a tree entry ([`names`]).
fn storable(path: &Path) -> bool {
    names::refusal(path).is_none()
}

/// Refuses a path git cannot store (`EPERM`), saying why.
fn check_storable(path: &Path) -> Result<(), TierError> {
    match names::refusal(path) {
        None => Ok(()),
        Some(why) => Err(TierError::Refused(format!("git cannot store {}: {why}", path.display()))),
    }
}

/// The NATS subject on which nodes sharing the remote `url` announce their pushes (the
/// payload is `<node> <commit>`); any message there makes the other nodes fetch at once.
pub fn notice_subject_for(url: &str) -> String {
    worker::subject_of(&crate::nats::redact(url))
}

/// Prepares a node's repository before its policy table is read: on the first mount with a
/// remote, fetches it and adopts its branch, and puts the shared policy file into the tree so
/// that this node starts with the cluster's table rather than seeding its own.
///
/// Only a valid table is ever put there (no mount could start with another): when the
/// branch's is not one (a broken table pushed with plain git), the newest valid table of its
/// history is. A tree whose table is not valid (installed by an older syncfs) is repaired the
/// same way, after a fetch, so that a remote fixed meanwhile heals the node.
pub fn bootstrap(state_dir: &Path, settings: &GitSettings) -> anyhow::Result<()> {
    worker::set_timeouts();
    let repo = Repo::open(&state_dir.join("git"))
        .map_err(|e| anyhow::anyhow!("cannot open the git repository {}: {e}", state_dir.join("git").display()))?;
    let policy_file = state_dir.join("tree").join(POLICY_FILE);
    let first = repo.target(repo::TREE).is_none() && repo.target(repo::MAIN).is_none();
    let broken = std::fs::read(&policy_file).ok().and_then(|b| PolicyTable::check_file(&b).err());
    let remote = Remote::new(settings);
    if !(first && remote.is_some()) && broken.is_none() {
        return Ok(());
    }
    if let Some(remote) = &remote {
        if let Err(e) = remote.fetch(&repo.git) {
            tracing::warn!(error = %e, "cannot fetch the git remote before reading the policy table; starting from this node's files");
            if broken.is_none() {
                return Ok(());
            }
        }
    }
    if first {
        if let Some(origin) = repo.target(repo::ORIGIN) {
            repo.set_ref(repo::MAIN, origin, None, "syncfs: first mount, the remote's branch")?;
        }
    }
    if broken.is_none() && policy_file.exists() {
        return Ok(());
    }
    let tips: Vec<Oid> = [repo::ORIGIN, repo::MAIN].iter().filter_map(|r| repo.target(r)).collect();
    let Some((commit, bytes)) = newest_valid_table(&repo, &tips)? else {
        return Ok(());
    };
    write_policy_file(&policy_file, &bytes)?;
    let tip_table = tips.first().and_then(|t| repo.tree_of(Some(*t)).ok().flatten()).and_then(|t| Repo::blob_at(Some(&t), Path::new(POLICY_FILE)));
    match &broken {
        Some(why) => tracing::warn!(%commit, reason = %why, "this node's policy table is not valid; took the newest valid one of the git branch"),
        None if tip_table == Some(Oid::hash_object(git2::ObjectType::Blob, &bytes)?) => {
            tracing::info!("took the policy table from the git remote")
        }
        None => tracing::warn!(%commit, "the git remote's policy table is not valid; took the newest valid one of its history"),
    }
    Ok(())
}

/// How many commits the search for a valid policy table looks at.
const TABLE_WALK_LIMIT: usize = 10_000;

/// The newest valid policy table on the branches `tips` (the first tip's first): its commit
/// and bytes. `None` when the tips have no table, or no commit has a valid one.
fn newest_valid_table(repo: &Repo, tips: &[Oid]) -> anyhow::Result<Option<(Oid, Vec<u8>)>> {
    let table_at = |commit: Oid| -> anyhow::Result<Option<Oid>> {
        Ok(Repo::blob_at(repo.tree_of(Some(commit))?.as_ref(), Path::new(POLICY_FILE)))
    };
    let mut invalid = std::collections::HashSet::new();
    let mut check = |commit: Oid| -> anyhow::Result<Option<(Oid, Vec<u8>)>> {
        let Some(blob) = table_at(commit)? else { return Ok(None) };
        if invalid.contains(&blob) {
            return Ok(None);
        }
        let bytes = repo.read_blob(blob)?;
        if PolicyTable::check_file(&bytes).is_ok() {
            return Ok(Some((commit, bytes)));
        }
        invalid.insert(blob);
        Ok(None)
    };
    let mut any = false;
    for tip in tips {
        any |= table_at(*tip)?.is_some();
        if let Some(found) = check(*tip)? {
            return Ok(Some(found));
        }
    }
    if !any {
        // The branch has no table (on purpose): the daemon seeds one.
        return Ok(None);
    }
    let mut walk = repo.git.revwalk()?;
    walk.set_sorting(git2::Sort::TIME)?;
    for tip in tips {
        walk.push(*tip)?;
    }
    for id in walk.take(TABLE_WALK_LIMIT) {
        if let Some(found) = check(id?)? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// Writes the policy file the way the daemon seeds it: the directory 0755 and the file 0644,
/// owned by the daemon, so that only the mount's owner can change the cluster's table.
fn write_policy_file(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = file.parent().expect("has a parent");
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    // Before the mount: nothing reads it yet, and a torn write is repaired like any broken table.
    std::fs::write(file, bytes)?;
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644))
}

/// Whether the branch's policy table is present and not valid: then this node keeps its own
/// (the last valid one), which is not a change of its own to commit.
fn branch_table_refused(repo: &Repo) -> Result<bool, git2::Error> {
    let tree = repo.tree_of(repo.target(repo::MAIN))?;
    Ok(match Repo::blob_at(tree.as_ref(), Path::new(POLICY_FILE)) {
        Some(blob) => PolicyTable::check_file(&repo.read_blob(blob)?).is_err(),
        None => false,
    })
}

/// Walks the tree for durable files and symlinks: path relative to the root and its entry,
/// and the files whose names git refuses (left by an older syncfs), with why.
fn scan_tree(tree_dir: &Path, policies: &PolicyTable) -> std::io::Result<(HashMap<PathBuf, Entry>, Vec<(PathBuf, String)>)> {
    let mut out = HashMap::new();
    let mut refused = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let entries = match std::fs::read_dir(tree_dir.join(&rel)) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let path = rel.join(entry.file_name());
            let kind = entry.file_type()?;
            if kind.is_dir() {
                if path != Path::new(crate::policy::HISTORY_DIR) {
                    stack.push(path);
                }
            } else if (kind.is_file() || kind.is_symlink()) && policies.resolve(&path).tier == TierKind::Git {
                if let Some(why) = names::refusal(&path) {
                    refused.push((path, why));
                    continue;
                }
                let entry = if kind.is_symlink() {
                    use std::os::unix::ffi::OsStrExt;
                    let target = std::fs::read_link(tree_dir.join(&path))?;
                    let blob = Oid::hash_object(git2::ObjectType::Blob, target.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
                    Entry { blob, kind: EntryKind::Link }
                } else {
                    use std::os::unix::fs::PermissionsExt;
                    let blob = Oid::hash_file(git2::ObjectType::Blob, tree_dir.join(&path)).map_err(std::io::Error::other)?;
                    Entry { blob, kind: EntryKind::of_file(entry.metadata()?.permissions().mode()) }
                };
                out.insert(path, entry);
            }
        }
    }
    Ok((out, refused))
}

/// Removes ref lock files a killed daemon left (`refs/**/*.lock`, `packed-refs.lock`): libgit2
/// refuses to move a locked ref, so one left by a `kill -9` during a fetch or push stopped every
/// later push. This mount holds the state directory's lock, so no other syncfs uses the repository.
fn remove_stale_locks(dir: &Path) {
    let mut stack = vec![dir.join("refs")];
    let mut locks = vec![dir.join("packed-refs.lock"), dir.join("HEAD.lock")];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "lock") {
                locks.push(p);
            }
        }
    }
    for lock in locks {
        if std::fs::remove_file(&lock).is_ok() {
            tracing::warn!(lock = %lock.display(), "removed a git lock file the last mount left (it was killed)");
        }
    }
}

/// Undoes what a `kill -9` interrupted, from the intents the last mount noted: a file an
/// open created and no close committed is removed (never committed, so no node gets an empty
/// file nobody closed), and a committed change whose install into the tree did not happen is
/// installed (so the older content left in the tree is not committed over it).
fn recover_intents(repo: &Repo, tree_dir: &Path, intents: &HashMap<PathBuf, intents::Intent>, synced: &HashMap<PathBuf, Entry>, held: &mut HashMap<PathBuf, Entry>) {
    let empty = Oid::hash_object(git2::ObjectType::Blob, b"").ok();
    for (path, intent) in intents {
        // Intents are noted for regular files only.
        let Some(entry) = held.get(path).copied().filter(|e| e.kind.is_file()) else { continue };
        let now = entry.blob;
        let file = tree_dir.join(path);
        match *intent {
            intents::Intent::Created if Some(now) == empty && !synced.contains_key(path) => {
                if std::fs::remove_file(&file).is_ok() {
                    tracing::info!(path = %path.display(), "a file created by an open that no close committed (the daemon stopped): removed, not committed");
                    held.remove(path);
                }
            }
            intents::Intent::Holds(blob) if blob != now && synced.get(path) != Some(&entry) => {
                let Ok(bytes) = repo.read_blob(blob) else { continue };
                let tmp = file.with_file_name(format!(".syncfs-recover-{}", std::process::id()));
                let written = (|| -> std::io::Result<()> {
                    use std::os::unix::fs::{MetadataExt, PermissionsExt};
                    let meta = std::fs::metadata(&file)?;
                    std::fs::write(&tmp, &bytes)?;
                    std::os::unix::fs::chown(&tmp, Some(meta.uid()), Some(meta.gid()))?;
                    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
                    std::fs::rename(&tmp, &file)
                })();
                match written {
                    Ok(()) => {
                        tracing::info!(path = %path.display(), %blob, "a committed change the daemon stopped before installing: installed");
                        held.insert(path.clone(), Entry { blob, kind: entry.kind });
                    }
                    Err(e) => {
                        let _ = std::fs::remove_file(&tmp);
                        tracing::warn!(path = %path.display(), error = %e, "cannot install a committed change the daemon stopped before installing");
                    }
                }
            }
            _ => {}
        }
    }
}

impl GitTier {
    /// Opens the node's repository under `state_dir` and finds what the tree holds that was
    /// never committed. Nothing moves until [`Tier::start`].
    pub fn open(
        state_dir: &Path,
        settings: &GitSettings,
        node: &str,
        policies: Arc<PolicyTable>,
        nats: Option<Arc<Nats>>,
        rt: tokio::runtime::Handle,
    ) -> anyhow::Result<GitTier> {
        let dir = state_dir.join("git");
        let tree_dir = state_dir.join("tree");
        remove_stale_locks(&dir);
        let open = || Repo::open(&dir).map_err(|e| anyhow::anyhow!("cannot open the git repository {}: {e}", dir.display()));
        let repo = open()?;
        let objects = open()?;
        let history = open()?;
        let (mut held, refused) = scan_tree(&tree_dir, &policies)?;
        // Changes in the tree that no commit has: the daemon stopped before committing them.
        let synced_at = repo.target(repo::TREE);
        let synced = match repo.tree_of(synced_at)? {
            Some(tree) => Repo::files(&tree),
            None => HashMap::new(),
        };
        let intents_file = dir.join("syncfs-intents");
        recover_intents(&repo, &tree_dir, &intents::Intents::load(&intents_file), &synced, &mut held);
        let intents = intents::Intents::create(&intents_file);
        let mut state = State { held: held.clone(), ..State::default() };
        for (path, why) in refused {
            tracing::warn!(path = %path.display(), reason = %why, "a file git cannot store: kept on this node, not committed");
            state.quarantined.insert(path, format!("{why}: kept on this node, not committed; rename it"));
        }
        let keeps_table = branch_table_refused(&repo)?;
        for (path, entry) in &held {
            if synced.get(path) != Some(entry) {
                if keeps_table && path == Path::new(POLICY_FILE) {
                    continue;
                }
                let stored = match entry.kind {
                    EntryKind::Link => std::fs::read_link(tree_dir.join(path))
                        .map_err(|e| git2::Error::from_str(&e.to_string()))
                        .and_then(|t| objects.git.blob(std::os::unix::ffi::OsStrExt::as_bytes(t.as_os_str()))),
                    _ => objects.git.blob_path(&tree_dir.join(path)),
                };
                stored.map_err(|e| anyhow::anyhow!("cannot store {}: {e}", path.display()))?;
                state.gen += 1;
                state.pending.insert(path.clone(), Pending { base: synced.get(path).map(|e| e.blob), blob: Some(*entry), gen: state.gen });
            }
        }
        for (path, entry) in &synced {
            // A name git refuses was never installed: its absence is no deletion.
            if !held.contains_key(path) && policies.resolve(path).tier == TierKind::Git && storable(path) {
                state.gen += 1;
                state.pending.insert(path.clone(), Pending { base: Some(entry.blob), blob: None, gen: state.gen });
            }
        }
        if !state.pending.is_empty() {
            tracing::info!(changes = state.pending.len(), "the tree holds changes no commit has (the last mount stopped before committing them); committing them now");
        }
        let remote = Remote::new(settings);
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            node: node.to_string(),
            policies,
            tree_dir,
            state: Mutex::new(state),
            info: Mutex::new(GitInfo {
                remote: remote.as_ref().map(|r| r.shown.clone()),
                ..GitInfo::default()
            }),
            objects: Mutex::new(objects),
            history: Mutex::new(history),
            views: Mutex::new(HashMap::new()),
            tx: Mutex::new(tx),
            ready: (Mutex::new(false), parking_lot::Condvar::new()),
            intents,
        });
        let worker = Worker::new(shared.clone(), repo, remote.clone(), settings, rx, nats.clone(), rt.clone());
        Ok(GitTier {
            shared,
            max_file_bytes: settings.max_file_bytes,
            worker: Arc::new(Mutex::new(Some(worker))),
            rt,
            nats,
            remote,
        })
    }

    /// Removes `path` from the branch for a policy change that moved it to another tier (its
    /// file stays in the tree, which is no longer git's): records its deletion, committed
    /// when the worker starts. Returns whether the branch lacks it already (the move is done).
    pub fn move_out(&self, path: &Path) -> bool {
        let on_branch = {
            let objects = self.shared.objects.lock();
            let tree = objects.tree_of(objects.target(repo::MAIN)).ok().flatten();
            Repo::entry_at(tree.as_ref(), path)
        };
        let Some(Entry { blob, .. }) = on_branch else { return true };
        let mut st = self.shared.state.lock();
        st.gen += 1;
        let gen = st.gen;
        st.pending.insert(path.to_path_buf(), Pending { base: Some(blob), blob: None, gen });
        drop(st);
        let _ = self.shared.tx.lock().send(worker::Cmd::Dirty);
        tracing::info!(path = %path.display(), "removing the moved path from git");
        false
    }

    /// What `syncfs status` shows.
    pub fn info(&self) -> GitInfo {
        // Pending changes first: the worker counts a commit as unpushed before it stops
        // counting its changes as pending, so this order never misses one.
        let (uncommitted, own) = {
            let st = self.shared.state.lock();
            let own: Vec<Quarantined> = st
                .quarantined
                .iter()
                .map(|(p, why)| Quarantined { path: p.display().to_string(), reason: why.clone() })
                .collect();
            (st.pending.len() as u64, own)
        };
        let mut info = self.shared.info.lock().clone();
        info.uncommitted = uncommitted;
        // The worker lists the branch's; this node's own come from the state.
        info.quarantined.extend(own);
        info.quarantined.sort();
        info.quarantined.dedup_by(|a, b| a.path == b.path);
        info
    }

    /// Waits until the first cycle has installed what the branch (and, if reachable, the
    /// remote) holds, so that a node joining a cluster serves its files from the first read.
    /// Returns whether it finished within `timeout`.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        let (lock, cond) = &self.shared.ready;
        let mut ready = lock.lock();
        if !*ready {
            cond.wait_for(&mut ready, timeout);
        }
        *ready
    }

    /// Runs one worker cycle now for a lock: commit and push what is pending, and with `fetch`
    /// also fetch and install the remote's changes. Waits at most [`LOCK_SYNC_WAIT`].
    fn sync_now(&self, fetch: bool) -> Op<(), TierError> {
        if self.remote.is_none() {
            return Op::ok(());
        }
        let shared = self.shared.clone();
        Op::pending(async move {
            blocking(move || {
                let (ack, done) = mpsc::channel();
                shared.send(Cmd::Sync { fetch, ack });
                if done.recv_timeout(LOCK_SYNC_WAIT).is_err() {
                    tracing::warn!(fetch, "the git cycle a lock asked for did not finish within {LOCK_SYNC_WAIT:?}; the other node may read older versions");
                }
                Ok(())
            })
            .await
        })
    }

    /// Asks the worker to fetch now (another node pushed).
    pub fn fetch_now(&self) {
        self.shared.send(Cmd::Fetch);
    }

    fn held(&self, path: &Path) -> Option<Entry> {
        self.shared.state.lock().held.get(path).copied()
    }

    /// The blob the tree holds for `path`.
    fn held_blob(&self, path: &Path) -> Option<Oid> {
        self.held(path).map(|e| e.blob)
    }

    /// How the tree's file at `path` is to be stored: executable or not, by its mode now
    /// (resolved beneath the tree's root, never through a symlink).
    fn file_kind(&self, path: &Path) -> EntryKind {
        use std::os::fd::AsFd;
        let mode = (|| {
            let root = std::fs::File::open(&self.shared.tree_dir).ok()?;
            let parent = path.parent().unwrap_or(Path::new(""));
            let name = crate::fs::tree::cname(path.file_name()?).ok()?;
            let st = if parent.as_os_str().is_empty() {
                crate::fs::tree::lstat_at(root.as_fd(), &name).ok()?
            } else {
                let dir = crate::fs::tree::resolve_dir(root.as_fd(), &crate::fs::tree::cname(parent.as_os_str()).ok()?).ok()?;
                crate::fs::tree::lstat_at(dir.as_fd(), &name).ok()?
            };
            Some(st.st_mode)
        })();
        match mode {
            Some(m) if m & libc::S_IFMT == libc::S_IFREG => EntryKind::of_file(m),
            // Gone meanwhile (or not a file): keep what the tree held.
            _ => self.held(path).map(|e| e.kind).filter(|k| k.is_file()).unwrap_or(EntryKind::File),
        }
    }

    /// Refuses content that changes an `immutable` field of the document the tree holds at
    /// `at` (EPERM at close, fsync or rename; the stored version stays).
    fn check_immutable(&self, at: &Target, content: &File) -> Result<Option<Vec<u8>>, TierError> {
        let rules = &at.policy.merge_rules;
        let checks = at.policy.consistency == Consistency::Merge
            && rules.values().any(|r| *r == MergeRule::Immutable)
            && (crate::merge::format_of(&at.path).is_some() || crate::merge::text::is_markdown(&at.path));
        let Some(old) = self.held(&at.path).filter(|e| checks && e.kind.is_file()).map(|e| e.blob) else {
            return Ok(None);
        };
        let len = content.metadata()?.len();
        if len > MAX_CHECKED_SIZE {
            return Err(TierError::Refused(format!(
                "{} is larger than {MAX_CHECKED_SIZE} bytes, the most syncfs checks for immutable fields",
                at.path.display()
            )));
        }
        let mut new = Vec::with_capacity(len as usize);
        crate::fs::tree::ReadAt::new(content).read_to_end(&mut new)?;
        let old = self.shared.objects.lock().read_blob(old).map_err(backend)?;
        let changed = crate::merge::immutable_changes(&at.path, rules, &old, &new);
        if !changed.is_empty() {
            return Err(TierError::Refused(format!(
                "{}: the immutable field{} {} cannot change once written",
                at.path.display(),
                if changed.len() > 1 { "s" } else { "" },
                changed.join(", ")
            )));
        }
        Ok(Some(new))
    }

    /// Checks `immutable` fields and stores the content as a blob.
    fn store(&self, at: &Target, content: &File) -> Result<Oid, TierError> {
        if let Some(bytes) = self.check_immutable(at, content)? {
            return self.shared.objects.lock().git.blob(&bytes).map_err(git_error);
        }
        let objects = self.shared.objects.lock();
        let mut writer = objects.git.blob_writer(None).map_err(git_error)?;
        std::io::copy(&mut crate::fs::tree::ReadAt::new(content), &mut writer)?;
        writer.flush()?;
        writer.commit().map_err(git_error)
    }
}

fn revision(oid: Oid) -> Revision {
    Revision(oid.to_string())
}

/// The revision the worker passes for a deletion it installs.
pub const DELETED: &str = "deleted";

impl Tier for GitTier {
    fn kind(&self) -> TierKind {
        TierKind::Git
    }

    fn write_mode(&self) -> WriteMode {
        WriteMode::Staged
    }

    fn revision(&self, at: &Target) -> Option<Revision> {
        self.held_blob(&at.path).map(revision)
    }

    fn revision_at(&self, at: &Target, when: std::time::Instant) -> Option<Revision> {
        let st = self.shared.state.lock();
        let current = st.held.get(&at.path).map(|e| revision(e.blob));
        st.log.at(&at.path, when, current)
    }

    fn max_file_size(&self, _at: &Target) -> Option<u64> {
        Some(self.max_file_bytes)
    }

    fn create(&self, at: &Target, kind: Kind, _exclusive: bool) -> Op<Option<Revision>, TierError> {
        // Exclusivity is this node's own O_EXCL: git has no cluster-wide create.
        match check_storable(&at.path) {
            Ok(()) => {
                if kind == Kind::File {
                    self.shared.intents.note(&at.path, intents::Intent::Created);
                }
                Op::ok(None)
            }
            Err(e) => Op::err(e),
        }
    }

    fn commit(&self, at: &Target, content: Arc<File>, base: Option<Revision>, durable: bool) -> Op<Option<Revision>, TierError> {
        if let Err(e) = check_storable(&at.path) {
            return Op::err(e);
        }
        let this = self.clone();
        let at = at.clone();
        Op::pending(async move {
            blocking(move || {
                let len = content.metadata()?.len();
                if len > this.max_file_bytes {
                    return Err(TierError::TooBig(format!(
                        "{} is {len} bytes; git paths take files up to {} bytes (git.max_file_bytes; the blob tier takes larger ones)",
                        at.path.display(),
                        this.max_file_bytes
                    )));
                }
                let git_dir = this.shared.objects.lock().git.path().to_path_buf();
                let blob = this.store(&at, &content).map_err(|e| space::or_full(e, &git_dir, len + space::GIT_MARGIN))?;
                if durable && space::short_of(&git_dir, space::GIT_MARGIN) {
                    // fsync promises a commit: refuse now rather than record a change whose
                    // commit cannot be written (the blob alone is garbage git collects).
                    return Err(space::no_space(format_args!("fsync of {}: no room for its commit", at.path.display())));
                }
                let base = base.and_then(|r| Oid::from_str(&r.0).ok()).or_else(|| this.held_blob(&at.path));
                let entry = Entry { blob, kind: this.file_kind(&at.path) };
                this.shared.record(&at.path, base, Some(entry), durable);
                Ok(Some(revision(blob)))
            })
            .await
        })
    }

    fn admit(&self, at: &Target, rev: Option<&Revision>) -> bool {
        let mut st = self.shared.state.lock();
        let path = &at.path;
        if let (Some(expected), Some(rev)) = (st.applying.get(path).copied(), rev) {
            let matches = match expected {
                Some(e) => rev.0 == e.blob.to_string(),
                None => rev.0 == DELETED,
            };
            if matches {
                // The worker brings the branch's version: not over a newer local change.
                if st.pending.contains_key(path) {
                    return false;
                }
                st.hold(path, expected);
                let gen = st.gen;
                st.merged_at.insert(path.clone(), gen);
                return true;
            }
        }
        let Some(oid) = rev.and_then(|r| Oid::from_str(&r.0).ok()) else {
            return true;
        };
        let mut entry = Entry { blob: oid, kind: st.held.get(path).map(|e| e.kind).filter(|k| k.is_file()).unwrap_or(EntryKind::File) };
        if let Some((local, gen)) = st.local.get(path).copied() {
            if local.blob == oid {
                st.local.remove(path);
                if st.merged_at.get(path).is_some_and(|m| *m >= gen) {
                    // The worker already installed a version that includes this change.
                    return false;
                }
                entry = local;
            }
        }
        st.hold(path, Some(entry));
        true
    }

    fn remove(&self, at: &Target, kind: Kind) -> Op<(), TierError> {
        if matches!(kind, Kind::File | Kind::Symlink) {
            let base = self.held_blob(&at.path);
            self.shared.record(&at.path, base, None, false);
        }
        Op::ok(())
    }

    fn rename(&self, from: &Target, to: &Target, kind: Kind, content: Option<Arc<File>>, base: Option<Revision>) -> Op<(), TierError> {
        if kind == Kind::Dir {
            return Op::err(TierError::CrossDevice(format!(
                "{} is a directory of git paths: it moves by copy and delete",
                from.path.display()
            )));
        }
        if let Err(e) = check_storable(&to.path) {
            return Op::err(e);
        }
        let held = self.held(&from.path);
        let content = match (content, held) {
            (Some(c), _) => Some(c),
            // A symlink moves as the entry it is.
            (None, Some(e)) if e.kind == EntryKind::Link => None,
            (None, _) => return Op::err(TierError::Backend("a git file moved without its content".into())),
        };
        let this = self.clone();
        let (from, to) = (from.clone(), to.clone());
        Op::pending(async move {
            blocking(move || {
                let entry = match (&content, this.held(&from.path)) {
                    (Some(content), held) => {
                        // Moving a document over another must keep its immutable fields too.
                        this.check_immutable(&to, content)?;
                        match held {
                            Some(e) => e,
                            None => Entry { blob: this.store(&to, content)?, kind: this.file_kind(&from.path) },
                        }
                    }
                    (None, Some(e)) => e,
                    (None, None) => return Err(TierError::Backend("a git symlink moved that the tier does not hold".into())),
                };
                let from_base = this.held_blob(&from.path);
                // The moved content was made on the version current when its file was
                // created; without one, on today's.
                let to_base = base.and_then(|r| Oid::from_str(&r.0).ok()).or_else(|| this.held_blob(&to.path));
                this.shared.record(&from.path, from_base, None, false);
                this.shared.record(&to.path, to_base, Some(entry), false);
                // No install follows a rename: the tree's file moves as it is.
                let mut st = this.shared.state.lock();
                st.hold(&to.path, Some(entry));
                st.local.remove(&to.path);
                Ok(())
            })
            .await
        })
    }

    fn supports_hard_links(&self) -> bool {
        false
    }

    fn shares_locks(&self) -> bool {
        true
    }

    fn publish(&self) -> Op<(), TierError> {
        self.sync_now(false)
    }

    fn settle(&self, _at: &Target) -> Op<(), TierError> {
        self.sync_now(true)
    }

    fn symlink(&self, at: &Target, target: &std::ffi::OsStr) -> Op<Option<Revision>, TierError> {
        use std::os::unix::ffi::OsStrExt;
        if let Err(e) = check_storable(&at.path) {
            return Op::err(e);
        }
        let blob = match self.shared.objects.lock().git.blob(target.as_bytes()) {
            Ok(b) => b,
            Err(e) => return Op::err(git_error(e)),
        };
        let entry = Entry { blob, kind: EntryKind::Link };
        let base = self.held_blob(&at.path);
        self.shared.record(&at.path, base, Some(entry), false);
        // The core makes the link in the tree next; no install follows.
        let mut st = self.shared.state.lock();
        st.hold(&at.path, Some(entry));
        st.local.remove(&at.path);
        Op::ok(Some(revision(blob)))
    }

    fn chmod(&self, at: &Target, mode: u32) {
        let kind = EntryKind::of_file(mode);
        // The latest content of the path: a change not committed yet, else the tree's.
        let (current, pending, base) = {
            let st = self.shared.state.lock();
            let pending = st.pending.get(&at.path).map(|p| p.blob);
            (pending.unwrap_or_else(|| st.held.get(&at.path).copied()), pending.is_some(), st.held.get(&at.path).map(|e| e.blob))
        };
        // A file no close committed yet takes its mode at its commit.
        let Some(current) = current.filter(|e| e.kind.is_file() && e.kind != kind) else { return };
        let entry = Entry { blob: current.blob, kind };
        self.shared.record(&at.path, base, Some(entry), false);
        let mut st = self.shared.state.lock();
        if st.held.get(&at.path).is_some_and(|e| e.blob == current.blob) {
            st.hold(&at.path, Some(entry));
        }
        if !pending {
            // Nothing is installed for a mode change; a commit being installed keeps its entry.
            st.local.remove(&at.path);
        }
    }

    fn attribute(&self, at: &Target, name: &str) -> Option<Vec<u8>> {
        match name {
            "user.syncfs.rev" => self.held_blob(&at.path).map(|o| o.to_string().into_bytes()),
            "user.syncfs.node" => {
                if let Some(w) = self.shared.state.lock().writers.get(&at.path) {
                    return Some(w.clone().into_bytes());
                }
                let node = worker::last_writer(&self.shared.history.lock(), &at.path)?;
                self.shared.state.lock().writers.insert(at.path.clone(), node.clone());
                Some(node.into_bytes())
            }
            "user.syncfs.conflicts" => {
                let names = self.conflicts_of(&at.path);
                (!names.is_empty()).then(|| names.join("\n").into_bytes())
            }
            _ => None,
        }
    }

    fn prepare_view(&self, root: std::os::fd::BorrowedFd<'_>, dir: &Path) -> std::io::Result<()> {
        history::prepare(&self.shared, root, dir)
    }

    fn start(&self, sink: Arc<dyn RemoteSink>) {
        let Some(worker) = self.worker.lock().take() else { return };
        worker.spawn(sink);
        if let (Some(nats), Some(remote)) = (&self.nats, &self.remote) {
            let subject = worker::notice_subject(remote);
            let client = nats.client.clone();
            let shared = self.shared.clone();
            self.rt.spawn(async move {
                use futures::StreamExt;
                let mut sub = match client.subscribe(subject.clone()).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot subscribe to git push notices; fetching on the interval only");
                        return;
                    }
                };
                while let Some(msg) = sub.next().await {
                    let from = String::from_utf8_lossy(&msg.payload);
                    if from.split(' ').next() != Some(shared.node.as_str()) {
                        shared.send(Cmd::Fetch);
                    }
                }
            });
        }
    }

    fn shutdown(&self) -> Op<(), TierError> {
        let shared = self.shared.clone();
        Op::pending(async move {
            blocking(move || {
                let (ack, done) = mpsc::channel();
                shared.send(Cmd::Shutdown(ack));
                // Commits what is pending and tries one push; a remote that does not answer
                // in time keeps the commits for the next mount.
                let _ = done.recv_timeout(Duration::from_secs(9));
                Ok(())
            })
            .await
        })
    }
}

impl GitTier {
    /// The conflict files beside `path` in the tree (resolved beneath the tree's root: a
    /// symlink on the way cannot lead the listing elsewhere).
    fn conflicts_of(&self, path: &Path) -> Vec<String> {
        use std::os::fd::AsFd;
        use std::os::unix::ffi::OsStrExt;
        let Some(name) = path.file_name() else { return Vec::new() };
        let mut prefix = name.as_bytes().to_vec();
        prefix.extend_from_slice(b".conflict-");
        let parent = path.parent().unwrap_or(Path::new(""));
        let Ok(root) = std::fs::File::open(&self.shared.tree_dir) else { return Vec::new() };
        let dir = if parent.as_os_str().is_empty() {
            Ok(std::os::fd::OwnedFd::from(root))
        } else {
            match crate::fs::tree::cname(parent.as_os_str()) {
                Ok(c) => crate::fs::tree::resolve_dir(root.as_fd(), &c),
                Err(_) => return Vec::new(),
            }
        };
        let Ok(dir) = dir else { return Vec::new() };
        let mut names: Vec<String> = crate::fs::tree::read_dir(dir.as_fd())
            .map(|entries| {
                entries
                    .into_iter()
                    .filter(|e| e.name.as_bytes().starts_with(&prefix))
                    .map(|e| e.name.to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}
