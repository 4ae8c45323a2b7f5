//! Mounting: the background daemon, readiness, signals, unmounting and stale mounts.
//!
//! `syncfs mount` without `--foreground` starts itself again with `--foreground` in a new
//! session, its output going to `--state/syncfs.log`, and waits on a pipe. The child writes
//! `ready` only after the mounted filesystem answered a request (the root's status attribute
//! with the child's own pid), or `error` and the reason, after making sure nothing is left
//! mounted. So exit status 0 always means "mounted and serving".
//!
//! A mount whose daemon died (kill -9, crash) is left by the kernel as a *stale* mount point:
//! every access fails with ENOTCONN ("Transport endpoint is not connected"). [`probe`] detects
//! it, and `syncfs umount` detaches it.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context};

use crate::config::MountConfig;
use crate::fs::{Core, CoreConfig};
use crate::fuse::{AdapterConfig, FuseAdapter, Invalidator};
use crate::nats::embedded::Embedded;
use crate::nats::Nats;
use crate::policy::{PolicyTable, TierKind, DEFAULT_POLICY_FILE, POLICY_FILE};
use crate::status::{FuseStatus, GitStatus, LostClaim, NatsStatus, QuarantinedPath, Status, TierStatus, STATUS_XATTR};
use crate::status::{BlobsStatus, StreamsStatus};
use crate::tier::blob::BlobTier;
use crate::tier::git::{self, GitTier};
use crate::tier::kv::KvTier;
use crate::tier::local::LocalTier;
use crate::tier::stream::StreamTier;
use crate::tier::Tiers;

/// The environment variable that carries the readiness pipe's fd to the child.
const READY_FD: &str = "SYNCFS_READY_FD";
/// The environment variable that tells the child where its log goes.
const LOG_FILE: &str = "SYNCFS_LOG_FILE";

/// What a path is, as far as mounting goes.
#[derive(Debug)]
pub enum MountState {
    /// A plain directory.
    NotMounted,
    /// A live syncfs mount, with its status.
    Syncfs(Box<Status>),
    /// A syncfs mount whose daemon is gone ("Transport endpoint is not connected").
    Stale,
    /// Some other filesystem is mounted there.
    OtherMount,
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// Reads an extended attribute of a path (following symlinks, as the user typed it).
pub fn get_xattr(path: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    let cpath = CString::new(path.as_os_str().as_bytes())?;
    let cname = CString::new(name)?;
    // SAFETY: valid C strings; size query.
    let size = unsafe { libc::getxattr(cpath.as_ptr(), cname.as_ptr(), std::ptr::null_mut(), 0) };
    if size < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut buf = vec![0u8; size as usize + 4096];
    // SAFETY: buffer of the given length.
    let n = unsafe { libc::getxattr(cpath.as_ptr(), cname.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Finds out what is at a mount point.
pub fn probe(mountpoint: &Path) -> anyhow::Result<MountState> {
    let meta = match std::fs::metadata(mountpoint) {
        Ok(m) => m,
        Err(e) if errno_of(&e) == libc::ENOTCONN => return Ok(MountState::Stale),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{} does not exist (create it with: mkdir -p {})", mountpoint.display(), mountpoint.display())
        }
        Err(e) => bail!("{}: {e}", mountpoint.display()),
    };
    if !meta.is_dir() {
        bail!("{} is not a directory", mountpoint.display());
    }
    let parent = mountpoint.parent().unwrap_or(Path::new("/"));
    let parent_meta = std::fs::metadata(parent).with_context(|| format!("{}", parent.display()))?;
    let is_mount = meta.dev() != parent_meta.dev() || meta.ino() == parent_meta.ino();
    if !is_mount {
        return Ok(MountState::NotMounted);
    }
    match get_xattr(mountpoint, STATUS_XATTR) {
        Ok(bytes) => {
            let status: Status = serde_json::from_slice(&bytes)
                .with_context(|| format!("{}: unreadable status", mountpoint.display()))?;
            Ok(MountState::Syncfs(Box::new(status)))
        }
        // ECONNABORTED: the request was in flight when the dead daemon's connection closed.
        Err(e) if matches!(errno_of(&e), libc::ENOTCONN | libc::ECONNABORTED) => Ok(MountState::Stale),
        Err(_) => Ok(MountState::OtherMount),
    }
}

/// A one-line explanation of a stale mount, with the fix.
pub fn stale_message(mountpoint: &Path) -> String {
    format!(
        "{mp} is a stale mount: its syncfs daemon is gone (Transport endpoint is not connected). \
         Run `syncfs umount {mp}` to clean it up; writes whose close() succeeded are kept in the \
         state directory and served again by the next mount.",
        mp = mountpoint.display()
    )
}

/// `syncfs mount`.
pub fn mount(cfg: MountConfig, foreground: bool) -> anyhow::Result<()> {
    if foreground {
        let ready = std::env::var(READY_FD).ok().and_then(|v| v.parse::<i32>().ok()).map(|fd| {
            std::env::remove_var(READY_FD);
            // SAFETY: the parent passed us this fd for our exclusive use.
            File::from(unsafe { OwnedFd::from_raw_fd(fd) })
        });
        let log_file = std::env::var(LOG_FILE).unwrap_or_default();
        let mut ready = ready;
        let result = run(&cfg, &mut ready, log_file);
        if let (Err(e), Some(pipe)) = (&result, ready.as_mut()) {
            let _ = write!(pipe, "error\n{e:#}");
        }
        return result;
    }
    spawn_daemon(&cfg)
}

fn spawn_daemon(cfg: &MountConfig) -> anyhow::Result<()> {
    // Fail early, in the caller's terminal, on what needs no daemon.
    check_mountpoint(&cfg.mountpoint)?;
    prepare_state_dir(&cfg.state_dir)?;
    let log_path = cfg.state_dir.join("syncfs.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .with_context(|| format!("cannot open the log {}", log_path.display()))?;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe");
    }
    // SAFETY: fresh fds we own.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let exe = std::env::current_exe().context("cannot find the syncfs executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .arg("--foreground")
        .env(READY_FD, "3")
        .env(LOG_FILE, &log_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let raw_write = write_end.as_raw_fd();
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if libc::dup2(raw_write, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the syncfs daemon")?;
    drop(write_end);
    let mut reader = BufReader::new(File::from(read_end));
    let mut first = String::new();
    reader.read_line(&mut first)?;
    if first.trim_end() == "ready" {
        println!(
            "syncfs: mounted {} (node {}, pid {}, log {})",
            cfg.mountpoint.display(),
            cfg.node,
            child.id(),
            log_path.display()
        );
        return Ok(());
    }
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut reader, &mut rest);
    let status = child.wait()?;
    if first.trim_end() == "error" && !rest.is_empty() {
        bail!("{rest}");
    }
    let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
    let tail: Vec<&str> = tail.lines().rev().take(10).collect();
    bail!(
        "the syncfs daemon exited ({status}) before the filesystem was ready; last log lines:\n{}",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

/// Refuses mount points that cannot be mounted on, explaining why.
fn check_mountpoint(mountpoint: &Path) -> anyhow::Result<()> {
    match probe(mountpoint)? {
        MountState::NotMounted => Ok(()),
        MountState::Stale => bail!("{}", stale_message(mountpoint)),
        MountState::Syncfs(status) => bail!(
            "{} is already a syncfs mount (node {}, pid {})",
            mountpoint.display(),
            status.node,
            status.pid
        ),
        MountState::OtherMount => bail!(
            "{} is already a mount point of another filesystem",
            mountpoint.display()
        ),
    }
}

fn prepare_state_dir(state: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(state)
        .with_context(|| format!("cannot create the state directory {}", state.display()))?;
    // The tree holds every user's files with their own modes; only the daemon may bypass FUSE.
    std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict {}", state.display()))?;
    for sub in ["tree", "spool"] {
        let dir = state.join(sub);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    Ok(())
}

/// Holds the state directory for one daemon.
fn lock_state_dir(state: &Path) -> anyhow::Result<File> {
    let path = state.join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: valid fd.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        bail!(
            "the state directory {} is in use by another syncfs daemon (pid {})",
            state.display(),
            holder.trim()
        );
    }
    file.set_len(0)?;
    (&file).write_all(std::process::id().to_string().as_bytes())?;
    Ok(file)
}

/// Loads the sync root's policy table, seeding it on the first mount.
fn load_policies(cfg: &MountConfig, tree: &Path) -> anyhow::Result<PolicyTable> {
    let file = tree.join(POLICY_FILE);
    if !file.exists() {
        let seed = match &cfg.policies_seed {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("cannot read policies_seed {}", path.display()))?,
            None => DEFAULT_POLICY_FILE.to_string(),
        };
        let dir = file.parent().expect("has a parent");
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        std::fs::write(&file, seed)?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
        tracing::info!(file = %file.display(), "seeded the policy table");
    }
    secure_policy_file(&file)?;
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("cannot read the policy file {}", file.display()))?;
    let table = PolicyTable::parse(&text, &file).map_err(|e| {
            anyhow!(
                "invalid policy file: {e}\n(this is the sync root's {POLICY_FILE}; fix it there, \
                 or check a copy with `syncfs policy check FILE`)"
            )
        })?;
    Ok(table)
}

/// Keeps `.syncfs/` 0755 and the policy file 0644, owned by the daemon's user, at every
/// mount: the table decides where every node's files go, so with `allow_other` no other local
/// user may rewrite it. (Older releases left a table adopted from the remote 0777/0666.)
/// Symlinks are left alone: the daemon never changes what a link points at.
fn secure_policy_file(file: &Path) -> anyhow::Result<()> {
    // SAFETY: these calls cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    for (path, mode) in [(file.parent().expect("has a parent"), 0o755), (file, 0o644)] {
        let meta = std::fs::symlink_metadata(path).with_context(|| format!("{}", path.display()))?;
        if meta.file_type().is_symlink() {
            return Ok(());
        }
        if (meta.uid(), meta.gid()) != (uid, gid) {
            std::os::unix::fs::lchown(path, Some(uid), Some(gid)).with_context(|| format!("cannot chown {}", path.display()))?;
        }
        if meta.mode() & 0o7777 != mode {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.mode() & 0o7777), "the policy table's mode was not {mode:o}; reset it");
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("cannot chmod {}", path.display()))?;
        }
    }
    Ok(())
}

fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 && lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: valid pointer.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

/// Unmounts, lazily if files are still open (the session ends when they close).
pub fn unmount(mountpoint: &Path) -> std::io::Result<()> {
    let c = CString::new(mountpoint.as_os_str().as_bytes())?;
    // SAFETY: valid C string.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if errno_of(&e) == libc::EBUSY {
        tracing::warn!("{} is busy; detaching it (it goes away when the last file closes)", mountpoint.display());
        // SAFETY: valid C string.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
            return Ok(());
        }
        return Err(std::io::Error::last_os_error());
    }
    Err(e)
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Makes `.syncfs/events` and `.syncfs/status` in the tree (syncfs's own files: the feed
/// starts empty at each mount, the status is made at each open) and starts the feed.
fn start_events(core: &Arc<Core>, tree: &Path, node: &str) -> anyhow::Result<()> {
    let dir = tree.join(".syncfs");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot make {}", dir.display()))?;
    for name in [crate::events::EVENTS_FILE, crate::status::STATUS_FILE] {
        let path = tree.join(name);
        let file = OpenOptions::new().create(true).write(true).truncate(true).mode(0o644).open(&path)
            .with_context(|| format!("cannot make {}", path.display()))?;
        file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    let path = tree.join(crate::events::EVENTS_FILE);
    let file = OpenOptions::new().append(true).open(&path)?;
    let weak = Arc::downgrade(core);
    let events = crate::events::Events::start(
        node.to_string(),
        file,
        Box::new(move || {
            if let Some(core) = weak.upgrade() {
                core.invalidate_path(Path::new(crate::events::EVENTS_FILE));
            }
        }),
    )?;
    core.set_events(Arc::new(events));
    Ok(())
}

/// Runs a mount in this process until it is unmounted or signalled.
fn run(cfg: &MountConfig, ready: &mut Option<File>, log_file: String) -> anyhow::Result<()> {
    crate::logging::init(&cfg.log);
    if !log_file.is_empty() {
        crate::logging::rotate_at(Path::new(&log_file), cfg.log_max_bytes);
    }
    // Modes from the kernel are final (it applied the caller's umask already).
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(0) };
    raise_fd_limit();
    check_mountpoint(&cfg.mountpoint)?;
    prepare_state_dir(&cfg.state_dir)?;
    let _lock = lock_state_dir(&cfg.state_dir)?;
    crate::logging::keep_panics_in(&cfg.state_dir);
    let tree = cfg.state_dir.join("tree");
    let spool = cfg.state_dir.join("spool");
    // A node joining a cluster takes the shared policy table from the git remote.
    git::bootstrap(&cfg.state_dir, &cfg.git)?;
    let policies = Arc::new(load_policies(cfg, &tree)?);
    // Paths the table moved to another tier since the tree's last mount (see src/moves.rs).
    let mut moves = crate::moves::Moves::prepare(&cfg.state_dir, &tree, &cfg.node, &policies)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("syncfs-rt")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;

    // NATS, when a policy needs it: the configured cluster, or a private server of our own.
    // (Git push notices use NATS too, when it is configured anyway.)
    let uses = |kind: TierKind| policies.reachable().iter().any(|p| p.tier == kind);
    let uses_nats = uses(TierKind::NatsKv)
        || uses(TierKind::NatsStream)
        || uses(TierKind::ObjectStore)
        || moves.needs_nats()
        || (!cfg.nats.urls.is_empty() && cfg.git.remote.is_some());
    let mut embedded = None;
    let nats = if uses_nats {
        let urls = if cfg.nats.urls.is_empty() {
            let server = Embedded::start(&cfg.state_dir.join("nats"), &cfg.node, &cfg.nats)?;
            let urls = vec![server.url.clone()];
            embedded = Some(server);
            urls
        } else {
            cfg.nats.urls.clone()
        };
        let wait = Duration::from_secs(5);
        Some(runtime.block_on(Nats::connect(&cfg.nats, &urls, embedded.is_some(), &cfg.node, wait))?)
    } else {
        None
    };

    runtime.block_on(moves.run_nats(nats.as_ref()));
    let mut tiers = Tiers::default();
    tiers.add(Arc::new(LocalTier));
    let kv = match &nats {
        Some(nats) if uses(TierKind::NatsKv) => {
            std::fs::create_dir_all(cfg.state_dir.join("journal"))?;
            let kv = KvTier::new(
                nats.clone(),
                &cfg.node,
                policies.clone(),
                &cfg.state_dir.join("journal/kv.log"),
                runtime.handle().clone(),
            )?;
            tiers.add(Arc::new(kv.clone()));
            Some(kv)
        }
        _ => None,
    };
    let stream = match &nats {
        Some(nats) if uses(TierKind::NatsStream) => {
            let stream = StreamTier::new(
                nats.clone(),
                &cfg.node,
                policies.clone(),
                cfg.stream.clone(),
                &cfg.state_dir.join("streams"),
                runtime.handle().clone(),
            )?;
            tiers.add(Arc::new(stream.clone()));
            Some(stream)
        }
        _ => None,
    };
    let blob = match &nats {
        Some(nats) if uses(TierKind::ObjectStore) => {
            let blob = BlobTier::new(
                nats.clone(),
                &cfg.node,
                policies.clone(),
                cfg.blob.clone(),
                &cfg.state_dir.join("blobs"),
                runtime.handle().clone(),
            )?;
            tiers.add(Arc::new(blob.clone()));
            Some(blob)
        }
        _ => None,
    };
    let git = if policies.reachable().iter().any(|p| p.tier == TierKind::Git) {
        let git = GitTier::open(
            &cfg.state_dir,
            &cfg.git,
            &cfg.node,
            policies.clone(),
            nats.clone(),
            runtime.handle().clone(),
        )?;
        tiers.add(Arc::new(git.clone()));
        Some(git)
    } else {
        None
    };
    runtime.block_on(moves.finish(nats.as_ref(), |p| git.as_ref().is_none_or(|g| g.move_out(p))));
    let core = Arc::new(
        Core::new(&tree, &spool, policies.clone(), tiers, CoreConfig::default())
            .map_err(|e| anyhow!("cannot open the state directory: {e}"))?,
    );
    start_events(&core, &tree, &cfg.node)?;
    core.start_tiers();
    if let Some(nats) = &nats {
        match runtime.block_on(crate::lock::Locks::shared(&cfg.node, nats, cfg.lock_lease)) {
            Ok(locks) => core.set_locks(locks),
            Err(e) => tracing::warn!(error = %e, "flock and fcntl locks stay on this node: the lock buckets cannot be opened"),
        }
    }
    if let Some(git) = &git {
        // A remote that does not answer holds the mount at most this long (libgit2's own
        // connect timeout is 10 s); its files then arrive once it does.
        if !git.wait_ready(Duration::from_secs(15)) {
            tracing::warn!("the git remote did not answer within 15 s; serving this node's files, the remote's follow");
        }
    }
    if nats.as_ref().is_some_and(|n| n.is_connected()) {
        // Serve what the cluster holds from the first read on; offline, the last known state.
        let limit = Duration::from_secs(30);
        runtime.block_on(async {
            if let Some(kv) = &kv {
                if !kv.wait_synced(limit).await {
                    tracing::warn!("the KV buckets were not fully read within 30 s; serving what arrived so far");
                }
            }
            if let Some(stream) = &stream {
                if !stream.wait_synced(limit).await {
                    tracing::warn!("the streams were not fully read within 30 s; serving what arrived so far");
                }
            }
            if let Some(blob) = &blob {
                if !blob.wait_synced(limit).await {
                    tracing::warn!("the blob pointers were not fully read within 30 s; serving what arrived so far");
                }
            }
        });
    }

    let overlay = crate::fs::tree::statfs(File::open(&tree)?.as_fd())
    .map(|s| s.f_type == libc::OVERLAYFS_SUPER_MAGIC)
    .unwrap_or(false);
    let passthrough_active = Arc::new(AtomicBool::new(false));
    let adapter = FuseAdapter::new(
        core.clone(),
        runtime.handle().clone(),
        AdapterConfig {
            ttl: cfg.fuse.cache_ttl,
            passthrough: cfg.fuse.passthrough,
            max_stack_depth: if overlay { 2 } else { 1 },
            passthrough_active: passthrough_active.clone(),
        },
    );

    let mut options = fuser::Config::default();
    options.mount_options = vec![
        fuser::MountOption::FSName("syncfs".into()),
        fuser::MountOption::Subtype("syncfs".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoDev,
    ];
    options.acl = if cfg.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    options.n_threads = Some(cfg.fuse.threads);
    options.clone_fd = true;
    let session = fuser::Session::new(adapter, &cfg.mountpoint, &options)
        .with_context(|| format!("cannot mount {}", cfg.mountpoint.display()))?;
    core.set_kernel_cache(Invalidator::start(session.notifier()));

    let started_at = now_rfc3339();
    let status_cfg = cfg.clone();
    let (status_nats, status_kv, status_git) = (nats.clone(), kv.clone(), git.clone());
    let (status_stream, status_blob) = (stream.clone(), blob.clone());
    let cache_max_bytes = cfg.blob.cache_max_bytes;
    let weak: Weak<Core> = Arc::downgrade(&core);
    core.set_status(Box::new(move || {
        let Some(core) = weak.upgrade() else {
            return Vec::new();
        };
        let (inodes, open_files) = core.usage();
        let tiers = core
            .counters
            .iter()
            .map(|(k, c)| {
                (
                    k.name().to_string(),
                    TierStatus {
                        commits: c.commits.load(Ordering::Relaxed),
                        refused: c.refused.load(Ordering::Relaxed),
                        commit_seconds: c.commit_micros.load(Ordering::Relaxed) as f64 / 1e6,
                        bytes: c.bytes.load(Ordering::Relaxed),
                    },
                )
            })
            .collect();
        let git_info = status_git.as_ref().map(|g| g.info()).unwrap_or_default();
        let status = Status {
            version: 1,
            node: status_cfg.node.clone(),
            pid: std::process::id(),
            mountpoint: status_cfg.mountpoint.display().to_string(),
            state_dir: status_cfg.state_dir.display().to_string(),
            log_file: log_file.clone(),
            started_at: started_at.clone(),
            fuse: FuseStatus {
                passthrough: passthrough_active.load(Ordering::Relaxed),
                threads: status_cfg.fuse.threads,
                allow_other: status_cfg.allow_other,
                read_requests: core.io.reads.load(Ordering::Relaxed),
                write_requests: core.io.writes.load(Ordering::Relaxed),
            },
            nats: match &status_nats {
                Some(n) => NatsStatus {
                    state: n.state().name().into(),
                    url: Some(n.url.clone()),
                    embedded: n.embedded,
                    buckets: status_kv.as_ref().map(|k| k.buckets().len()).unwrap_or(0),
                    keys: status_kv.as_ref().map(|k| k.keys()).unwrap_or(0),
                    unknown_outcomes: status_kv.as_ref().map(|k| k.unknown_outcomes()).unwrap_or(0),
                    lost_claims: status_kv
                        .as_ref()
                        .map(|k| k.lost_claims())
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(p, reason)| LostClaim { path: p.display().to_string(), reason })
                        .collect(),
                },
                None => NatsStatus {
                    state: "not configured".into(),
                    url: None,
                    embedded: false,
                    buckets: 0,
                    keys: 0,
                    unknown_outcomes: 0,
                    lost_claims: Vec::new(),
                },
            },
            git: GitStatus {
                remote: git_info.remote,
                last_push: git_info.last_push,
                last_pull: git_info.last_pull,
                unpushed: git_info.unpushed,
                uncommitted: git_info.uncommitted,
                head: git_info.head,
                error: git_info.error,
                quarantined: git_info
                    .quarantined
                    .into_iter()
                    .map(|q| QuarantinedPath { path: q.path, reason: q.reason })
                    .collect(),
                policy_error: git_info.policy_error,
            },
            tiers,
            pending_writes: status_kv.as_ref().map(|k| k.pending() as u64).unwrap_or(0),
            conflicts: git_info.conflicts,
            policies: core.policies().policies().len(),
            inodes,
            open_files,
            streams: status_stream
                .as_ref()
                .map(|s| {
                    let (streams, files) = s.usage();
                    StreamsStatus { streams, files }
                })
                .unwrap_or_default(),
            blobs: status_blob
                .as_ref()
                .map(|b| {
                    let u = b.usage();
                    BlobsStatus {
                        buckets: u.buckets,
                        paths: u.paths,
                        cached: u.cached,
                        cached_bytes: u.cached_bytes,
                        cache_max_bytes,
                        gc: u.gc,
                    }
                })
                .unwrap_or_default(),
            journal_damage: status_kv.as_ref().map(|k| k.journal_damage()).unwrap_or_default(),
            events: core
                .events()
                .map(|e| {
                    let (written, dropped) = e.counts();
                    crate::status::EventsStatus { written, dropped }
                })
                .unwrap_or_default(),
            locks_held: core.locks().held(),
            log: crate::status::LogStatus {
                left_out: crate::logging::left_out_lines(),
                dropped: crate::logging::dropped_lines(),
            },
        };
        serde_json::to_vec(&status).unwrap_or_default()
    }));

    if let Some(addr) = cfg.metrics_listen {
        let weak = Arc::downgrade(&core);
        let produce: crate::metrics::StatusFn = Arc::new(move || weak.upgrade().map(|c| c.status_json()).unwrap_or_default());
        let bound = crate::metrics::start(runtime.handle(), addr, produce)?;
        tracing::info!(%bound, "serving Prometheus metrics");
    }

    // Signals unmount; the session loop below then returns.
    let mountpoint = cfg.mountpoint.clone();
    runtime.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: unmounting"),
            _ = int.recv() => tracing::info!("SIGINT: unmounting"),
        }
        if let Err(e) = unmount(&mountpoint) {
            tracing::error!(error = %e, "unmount failed");
        }
    });

    // Readiness: the mounted filesystem must answer with our own pid before we say so.
    let pipe = ready.take();
    let mountpoint = cfg.mountpoint.clone();
    std::thread::Builder::new().name("syncfs-ready".into()).spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        let me = std::process::id();
        loop {
            match probe(&mountpoint) {
                Ok(MountState::Syncfs(status)) if status.pid == me => {
                    tracing::info!(mountpoint = %mountpoint.display(), "mounted and serving");
                    if let Some(mut pipe) = pipe {
                        let _ = pipe.write_all(b"ready\n");
                    }
                    return;
                }
                _ if Instant::now() > deadline => {
                    let msg = format!("{} did not answer within 20 s after mounting", mountpoint.display());
                    tracing::error!("{msg}");
                    if let Some(mut pipe) = pipe {
                        let _ = write!(pipe, "error\n{msg}");
                    }
                    let _ = unmount(&mountpoint);
                    return;
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    })?;

    // From this thread, which runs the session: the guard's death signal follows it.
    let mut guard = match crate::guard::start(&cfg.mountpoint) {
        Ok(child) => Some(child),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the guard; a killed daemon may leave programs waiting on the mount");
            None
        }
    };
    let result = session.run();
    if let Some(mut g) = guard.take() {
        let _ = g.kill();
        let _ = g.wait();
    }
    tracing::info!(mountpoint = %cfg.mountpoint.display(), "unmounted");
    // Release what this mount holds (locks, ephemeral claims), then stop.
    let shutdown = core.shutdown();
    let locks = core.locks().clone();
    let finished = runtime.block_on(async move {
        let _ = tokio::time::timeout(Duration::from_secs(5), locks.release_all()).await;
        let done = tokio::time::timeout(Duration::from_secs(10), shutdown.into_future()).await;
        if let Some(nats) = &nats {
            // Flushes what is in flight and closes the connection, so no client task outlives
            // the runtime.
            let _ = tokio::time::timeout(Duration::from_secs(5), nats.client.drain()).await;
        }
        done
    });
    if finished.is_err() {
        tracing::warn!("tiers did not shut down within 10 s");
    }
    runtime.shutdown_timeout(Duration::from_secs(10));
    if let Some(server) = embedded.take() {
        server.stop();
    }
    result.context("the FUSE session ended with an error")
}

/// Whether a process exists and has not exited (a zombie has exited: daemons reparented to an
/// init that does not reap them linger as zombies).
pub fn process_alive(pid: u32) -> bool {
    let running = |stat: &str| {
        // The state follows the command name, which is in parentheses and may hold spaces.
        let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
        !matches!(state, Some('Z') | Some('X') | None)
    };
    // A killed process's leader turns zombie while its other threads still exit, holding its
    // files (a FUSE daemon's /dev/fuse): it is alive until no thread is.
    match std::fs::read_dir(format!("/proc/{pid}/task")) {
        Err(_) => false,
        Ok(tasks) => tasks.flatten().any(|t| {
            std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| running(&stat))
        }),
    }
}

/// `syncfs umount`: unmounts and waits for the daemon to finish; cleans stale mounts.
pub fn umount(mountpoint: &Path) -> anyhow::Result<()> {
    let mountpoint = crate::config::absolute(mountpoint)?;
    let pid = match probe(&mountpoint)? {
        MountState::NotMounted => bail!("{} is not mounted", mountpoint.display()),
        MountState::OtherMount => bail!("{} is not a syncfs mount", mountpoint.display()),
        MountState::Stale => {
            let c = CString::new(mountpoint.as_os_str().as_bytes())?;
            // SAFETY: valid C string.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                let e = std::io::Error::last_os_error();
                bail!("cannot detach the stale mount {}: {e}", mountpoint.display());
            }
            println!(
                "syncfs: {} was a stale mount (its daemon had exited); detached it",
                mountpoint.display()
            );
            return Ok(());
        }
        MountState::Syncfs(status) => status.pid,
    };
    let c = CString::new(mountpoint.as_os_str().as_bytes())?;
    // SAFETY: valid C string.
    if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
        let e = std::io::Error::last_os_error();
        match errno_of(&e) {
            libc::EBUSY => bail!(
                "{} is busy: a process has a file or directory open there (see `fuser -vm {}`); \
                 close it and run `syncfs umount` again",
                mountpoint.display(),
                mountpoint.display()
            ),
            libc::EPERM => {
                let status = Command::new("fusermount3").arg("-u").arg(&mountpoint).status();
                if !matches!(status, Ok(s) if s.success()) {
                    bail!("cannot unmount {}: {e}", mountpoint.display());
                }
            }
            _ => bail!("cannot unmount {}: {e}", mountpoint.display()),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while process_alive(pid) {
        if Instant::now() > deadline {
            bail!("unmounted {}, but the daemon (pid {pid}) is still running after 60 s", mountpoint.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("syncfs: unmounted {}", mountpoint.display());
    Ok(())
}
