//! Mount settings: command-line flags over an optional config file (`--config FILE`, YAML).
//!
//! Every key is listed in docs/CONFIGURATION.md. Unknown keys are errors, not warnings: a
//! misspelt setting silently ignored is a setting that silently does not apply.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};

use crate::nats::{NatsSettings, Secret};
use crate::tier::blob::BlobSettings;
use crate::tier::git::GitSettings;
use crate::tier::stream::StreamSettings;
use crate::yaml::{self, Node};

/// FUSE session settings.
#[derive(Debug, Clone, PartialEq)]
pub struct FuseSettings {
    /// Worker threads reading kernel requests.
    pub threads: usize,
    /// Use FUSE passthrough for local files when the kernel offers it.
    pub passthrough: bool,
    /// How long the kernel caches names and attributes.
    pub cache_ttl: Duration,
}

impl Default for FuseSettings {
    fn default() -> Self {
        FuseSettings {
            threads: 4,
            passthrough: true,
            cache_ttl: Duration::from_secs(10),
        }
    }
}

/// Everything `syncfs mount` needs, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct MountConfig {
    /// Where the sync root appears.
    pub mountpoint: PathBuf,
    /// This node's private state.
    pub state_dir: PathBuf,
    /// This node's name.
    pub node: String,
    /// Let other users (and containers) use the mount; the kernel still checks permissions.
    pub allow_other: bool,
    /// FUSE settings.
    pub fuse: FuseSettings,
    /// A policy file to seed a new sync root with, instead of the built-in default.
    pub policies_seed: Option<PathBuf>,
    /// The log filter (`SYNCFS_LOG` wins).
    pub log: String,
    /// A background mount's log is rotated at this size (`log_max_bytes`).
    pub log_max_bytes: u64,
    /// NATS: servers (`--nats`, `nats.url`; none means the embedded default), credentials,
    /// TLS and bucket settings.
    pub nats: NatsSettings,
    /// The durable tier: its remote (`--git-remote`, `git.remote`), timing and credentials.
    pub git: GitSettings,
    /// The append tier's stream limits (`nats.stream.*`).
    pub stream: StreamSettings,
    /// The blob tier: object store, cache and collection (`nats.object_store.*`, `cache.*`).
    pub blob: BlobSettings,
    /// How long a dead mount's `flock`/`fcntl` locks last (`locks.lease_ms`).
    pub lock_lease: Duration,
    /// Where Prometheus metrics are served (`metrics.listen`), if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Where a background mount's log is rotated unless `log_max_bytes` says otherwise.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 64 << 20;

/// Values read from a config file; `None` where the file is silent.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FileConfig {
    /// `node`
    pub node: Option<String>,
    /// `state`
    pub state: Option<PathBuf>,
    /// `allow_other`
    pub allow_other: Option<bool>,
    /// `log`
    pub log: Option<String>,
    /// `log_max_bytes`
    pub log_max_bytes: Option<u64>,
    /// `policies_seed`
    pub policies_seed: Option<PathBuf>,
    /// `fuse.threads`
    pub threads: Option<usize>,
    /// `fuse.passthrough`
    pub passthrough: Option<bool>,
    /// `fuse.cache_ttl_ms`
    pub cache_ttl_ms: Option<u64>,
    /// `nats.*`
    pub nats: NatsSettings,
    /// `git.*`
    pub git: GitSettings,
    /// `nats.stream.*`
    pub stream: StreamSettings,
    /// `nats.object_store.*` and `cache.*`
    pub blob: BlobSettings,
    /// `locks.lease_ms`
    pub lock_lease_ms: Option<u64>,
    /// `metrics.listen`
    pub metrics_listen: Option<std::net::SocketAddr>,
}

fn at(file: &Path, node: &Node, reason: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{}:{}:{}: {reason}", file.display(), node.line, node.col)
}

fn string(file: &Path, node: &Node, key: &str) -> anyhow::Result<String> {
    node.as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .ok_or_else(|| at(file, node, format!("`{key}` must be a non-empty string")))
}

fn boolean(file: &Path, node: &Node, key: &str) -> anyhow::Result<bool> {
    node.as_bool()
        .ok_or_else(|| at(file, node, format!("`{key}` must be true or false")))
}

fn number(file: &Path, node: &Node, key: &str) -> anyhow::Result<u64> {
    node.as_u64()
        .ok_or_else(|| at(file, node, format!("`{key}` must be a whole number")))
}

fn replicas(file: &Path, node: &Node, key: &str) -> anyhow::Result<usize> {
    let r = number(file, node, key)?;
    if !(1..=5).contains(&r) {
        return Err(at(file, node, format!("`{key}` must be between 1 and 5")));
    }
    Ok(r as usize)
}

fn entries<'a>(file: &Path, node: &'a Node, what: &str) -> anyhow::Result<&'a [(Node, Node)]> {
    node.as_map()
        .ok_or_else(|| at(file, node, format!("{what} must be a mapping")))
}

impl FileConfig {
    /// Reads and checks a config file.
    pub fn load(file: &Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read config file {}", file.display()))?;
        FileConfig::parse(&text, file)
    }

    /// Parses config text; `file` names it in errors.
    pub fn parse(text: &str, file: &Path) -> anyhow::Result<FileConfig> {
        let mut cfg = FileConfig::default();
        let Some(root) = yaml::parse(text)
            .map_err(|e| anyhow!("{}:{}:{}: invalid YAML: {}", file.display(), e.line, e.col, e.message))?
        else {
            return Ok(cfg);
        };
        let base = file.parent().unwrap_or(Path::new("."));
        for (key, value) in entries(file, &root, "the config file")? {
            match key.as_str().unwrap_or("") {
                "node" => cfg.node = Some(string(file, value, "node")?),
                "state" => cfg.state = Some(base.join(string(file, value, "state")?)),
                "allow_other" => cfg.allow_other = Some(boolean(file, value, "allow_other")?),
                "log" => cfg.log = Some(string(file, value, "log")?),
                "log_max_bytes" => {
                    let n = number(file, value, "log_max_bytes")?;
                    if n < 4096 {
                        return Err(at(file, value, "`log_max_bytes` must be at least 4096"));
                    }
                    cfg.log_max_bytes = Some(n);
                }
                "policies_seed" => {
                    cfg.policies_seed = Some(base.join(string(file, value, "policies_seed")?))
                }
                "fuse" => {
                    for (k, v) in entries(file, value, "`fuse`")? {
                        match k.as_str().unwrap_or("") {
                            "threads" => {
                                let n = number(file, v, "fuse.threads")?;
                                if !(1..=64).contains(&n) {
                                    return Err(at(file, v, "`fuse.threads` must be between 1 and 64"));
                                }
                                cfg.threads = Some(n as usize);
                            }
                            "passthrough" => cfg.passthrough = Some(boolean(file, v, "fuse.passthrough")?),
                            "cache_ttl_ms" => cfg.cache_ttl_ms = Some(number(file, v, "fuse.cache_ttl_ms")?),
                            other => {
                                return Err(at(file, k, format!(
                                    "unknown key `fuse.{other}` (expected threads, passthrough, cache_ttl_ms)"
                                )))
                            }
                        }
                    }
                }
                "nats" => {
                    let n = &mut cfg.nats;
                    for (k, v) in entries(file, value, "`nats`")? {
                        let key = k.as_str().unwrap_or("");
                        let path = |v: &Node, what: &str| string(file, v, what).map(|s| base.join(s));
                        match key {
                            "url" => match v.as_seq() {
                                Some(items) => {
                                    for item in items {
                                        n.urls.push(string(file, item, "nats.url")?);
                                    }
                                }
                                None => n.urls.push(string(file, v, "nats.url")?),
                            },
                            "user" => n.user = Some(string(file, v, "nats.user")?),
                            "listen" => n.listen = Some(string(file, v, "nats.listen")?),
                            "password" => n.password = Some(Secret(string(file, v, "nats.password")?)),
                            "token" => n.token = Some(Secret(string(file, v, "nats.token")?)),
                            "credentials" => n.credentials = Some(path(v, "nats.credentials")?),
                            "timeout_ms" => n.timeout = Duration::from_millis(number(file, v, "nats.timeout_ms")?.max(1)),
                            "ping_interval_ms" => {
                                n.ping_interval = Duration::from_millis(number(file, v, "nats.ping_interval_ms")?.max(100))
                            }
                            "tls" => {
                                for (tk, tv) in entries(file, v, "`nats.tls`")? {
                                    match tk.as_str().unwrap_or("") {
                                        "ca" => n.tls_ca = Some(path(tv, "nats.tls.ca")?),
                                        "cert" => n.tls_cert = Some(path(tv, "nats.tls.cert")?),
                                        "key" => n.tls_key = Some(path(tv, "nats.tls.key")?),
                                        "required" => n.tls_required = boolean(file, tv, "nats.tls.required")?,
                                        other => {
                                            return Err(at(file, tk, format!(
                                                "unknown key `nats.tls.{other}` (expected ca, cert, key, required)"
                                            )))
                                        }
                                    }
                                }
                            }
                            "kv" => {
                                for (kk, kvv) in entries(file, v, "`nats.kv`")? {
                                    match kk.as_str().unwrap_or("") {
                                        "replicas" => {
                                            let r = number(file, kvv, "nats.kv.replicas")?;
                                            if !(1..=5).contains(&r) {
                                                return Err(at(file, kvv, "`nats.kv.replicas` must be between 1 and 5"));
                                            }
                                            n.replicas = r as usize;
                                        }
                                        "history" => {
                                            let h = number(file, kvv, "nats.kv.history")?;
                                            if !(1..=64).contains(&h) {
                                                return Err(at(file, kvv, "`nats.kv.history` must be between 1 and 64"));
                                            }
                                            n.history = h as i64;
                                        }
                                        other => {
                                            return Err(at(file, kk, format!(
                                                "unknown key `nats.kv.{other}` (expected replicas, history)"
                                            )))
                                        }
                                    }
                                }
                            }
                            "stream" => {
                                let s = &mut cfg.stream;
                                for (sk, sv) in entries(file, v, "`nats.stream`")? {
                                    let positive = |what: &str| {
                                        let n = number(file, sv, what)?;
                                        if n == 0 || n > i64::MAX as u64 {
                                            return Err(at(file, sv, format!("`{what}` must be a positive number")));
                                        }
                                        Ok(n)
                                    };
                                    match sk.as_str().unwrap_or("") {
                                        "max_bytes" => s.max_bytes = Some(positive("nats.stream.max_bytes")? as i64),
                                        "max_msgs" => s.max_msgs = Some(positive("nats.stream.max_msgs")? as i64),
                                        "replicas" => s.replicas = replicas(file, sv, "nats.stream.replicas")?,
                                        "check_interval_ms" => {
                                            s.check_interval = Duration::from_millis(positive("nats.stream.check_interval_ms")?)
                                        }
                                        other => {
                                            return Err(at(file, sk, format!(
                                                "unknown key `nats.stream.{other}` (expected max_bytes, max_msgs, replicas, \
                                                 check_interval_ms)"
                                            )))
                                        }
                                    }
                                }
                            }
                            "object_store" => {
                                let b = &mut cfg.blob;
                                for (ok, ov) in entries(file, v, "`nats.object_store`")? {
                                    let ms = |what: &str| number(file, ov, what).map(|n| Duration::from_millis(n.max(1)));
                                    match ok.as_str().unwrap_or("") {
                                        "bucket" => {
                                            let name = string(file, ov, "nats.object_store.bucket")?;
                                            if !name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-') {
                                                return Err(at(file, ov, "`nats.object_store.bucket` may hold only letters, digits, `_` and `-`"));
                                            }
                                            b.bucket = name;
                                        }
                                        "replicas" => b.replicas = replicas(file, ov, "nats.object_store.replicas")?,
                                        "chunk_bytes" => {
                                            let n = number(file, ov, "nats.object_store.chunk_bytes")?;
                                            if !(1024..=(8 << 20)).contains(&n) {
                                                return Err(at(file, ov, "`nats.object_store.chunk_bytes` must be between 1024 and 8388608"));
                                            }
                                            b.chunk_bytes = n as usize;
                                        }
                                        "gc_interval_ms" => b.gc_interval = ms("nats.object_store.gc_interval_ms")?,
                                        "gc_grace_ms" => b.gc_grace = ms("nats.object_store.gc_grace_ms")?,
                                        other => {
                                            return Err(at(file, ok, format!(
                                                "unknown key `nats.object_store.{other}` (expected bucket, replicas, \
                                                 chunk_bytes, gc_interval_ms, gc_grace_ms)"
                                            )))
                                        }
                                    }
                                }
                            }
                            other => {
                                return Err(at(file, k, format!(
                                    "unknown key `nats.{other}` (expected url, user, password, token, \
                                     credentials, tls, kv, stream, object_store, timeout_ms, ping_interval_ms)"
                                )))
                            }
                        }
                    }
                    if n.password.is_some() != n.user.is_some() {
                        return Err(at(file, value, "`nats.user` and `nats.password` go together"));
                    }
                }
                "cache" => {
                    for (k, v) in entries(file, value, "`cache`")? {
                        match k.as_str().unwrap_or("") {
                            "max_bytes" => cfg.blob.cache_max_bytes = number(file, v, "cache.max_bytes")?,
                            other => {
                                return Err(at(file, k, format!("unknown key `cache.{other}` (expected max_bytes)")))
                            }
                        }
                    }
                }
                "metrics" => {
                    for (k, v) in entries(file, value, "`metrics`")? {
                        match k.as_str().unwrap_or("") {
                            "listen" => {
                                let text = string(file, v, "metrics.listen")?;
                                let addr = text.parse::<std::net::SocketAddr>().map_err(|_| {
                                    at(file, v, format!("`metrics.listen` must be IP:PORT (127.0.0.1:9464), not `{text}`"))
                                })?;
                                cfg.metrics_listen = Some(addr);
                            }
                            other => return Err(at(file, k, format!("unknown key `metrics.{other}` (expected listen)"))),
                        }
                    }
                }
                "locks" => {
                    for (k, v) in entries(file, value, "`locks`")? {
                        match k.as_str().unwrap_or("") {
                            "lease_ms" => {
                                let n = number(file, v, "locks.lease_ms")?;
                                if n < 1000 {
                                    return Err(at(file, v, "`locks.lease_ms` must be at least 1000"));
                                }
                                cfg.lock_lease_ms = Some(n);
                            }
                            other => return Err(at(file, k, format!("unknown key `locks.{other}` (expected lease_ms)"))),
                        }
                    }
                }
                "git" => {
                    let g = &mut cfg.git;
                    for (k, v) in entries(file, value, "`git`")? {
                        let ms = |what: &str| number(file, v, what).map(|n| Duration::from_millis(n.max(1)));
                        match k.as_str().unwrap_or("") {
                            "remote" => g.remote = Some(string(file, v, "git.remote")?),
                            "quiet_ms" => g.quiet = ms("git.quiet_ms")?,
                            "max_delay_ms" => g.max_delay = ms("git.max_delay_ms")?,
                            "fetch_interval_ms" => g.fetch_interval = ms("git.fetch_interval_ms")?,
                            "max_file_bytes" => g.max_file_bytes = number(file, v, "git.max_file_bytes")?.max(1),
                            "username" => g.username = Some(string(file, v, "git.username")?),
                            "password" => g.password = Some(Secret(string(file, v, "git.password")?)),
                            "ssh_key" => g.ssh_key = Some(base.join(string(file, v, "git.ssh_key")?)),
                            "ssh_passphrase" => {
                                g.ssh_passphrase = Some(Secret(string(file, v, "git.ssh_passphrase")?))
                            }
                            other => {
                                return Err(at(file, k, format!(
                                    "unknown key `git.{other}` (expected remote, quiet_ms, max_delay_ms, \
                                     fetch_interval_ms, max_file_bytes, username, password, ssh_key, ssh_passphrase)"
                                )))
                            }
                        }
                    }
                    if g.max_delay < g.quiet {
                        return Err(at(file, value, "`git.max_delay_ms` must not be shorter than `git.quiet_ms`"));
                    }
                }
                other => {
                    return Err(at(
                        file,
                        key,
                        format!(
                            "unknown key `{other}` (expected node, state, allow_other, log, \
                             log_max_bytes, policies_seed, fuse, nats, git, cache, locks, metrics)"
                        ),
                    ))
                }
            }
        }
        Ok(cfg)
    }
}

/// Flags given on the command line for `mount`.
#[derive(Debug, Default, Clone)]
pub struct MountFlags {
    /// `MOUNTPOINT`
    pub mountpoint: PathBuf,
    /// `--state`
    pub state: Option<PathBuf>,
    /// `--config`
    pub config: Option<PathBuf>,
    /// `--nats` (repeatable)
    pub nats: Vec<String>,
    /// `--git-remote`
    pub git_remote: Option<String>,
    /// `--node`
    pub node: Option<String>,
    /// `-o allow_other`
    pub allow_other: bool,
    /// `--listen`
    pub listen: Option<String>,
}

impl MountConfig {
    /// Resolves flags over the config file over defaults.
    pub fn resolve(flags: &MountFlags) -> anyhow::Result<MountConfig> {
        let file = match &flags.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let mountpoint = absolute(&flags.mountpoint)?;
        let state_dir = match flags.state.clone().or(file.state.clone()) {
            Some(dir) => absolute(&dir)?,
            None => default_state_dir(&mountpoint)?,
        };
        let mut nats = file.nats.clone();
        if !flags.nats.is_empty() {
            nats.urls = flags.nats.clone();
        }
        if flags.listen.is_some() {
            nats.listen = flags.listen.clone();
        }
        if nats.listen.is_some() && !nats.urls.is_empty() {
            bail!("--listen (nats.listen) is where the embedded server listens; it cannot be combined with --nats (nats.url)");
        }
        let nats = nats.with_env();
        let mut git = file.git.clone();
        if let Some(remote) = &flags.git_remote {
            git.remote = Some(remote.clone());
        }
        let git = git.with_env();
        let defaults = FuseSettings::default();
        Ok(MountConfig {
            mountpoint,
            state_dir,
            node: flags.node.clone().or(file.node.clone()).unwrap_or_else(hostname),
            allow_other: flags.allow_other || file.allow_other.unwrap_or(false),
            fuse: FuseSettings {
                threads: file.threads.unwrap_or(defaults.threads),
                passthrough: file.passthrough.unwrap_or(defaults.passthrough),
                cache_ttl: file
                    .cache_ttl_ms
                    .map(Duration::from_millis)
                    .unwrap_or(defaults.cache_ttl),
            },
            policies_seed: file.policies_seed.clone(),
            log: file.log.clone().unwrap_or_else(|| "info".into()),
            log_max_bytes: file.log_max_bytes.unwrap_or(DEFAULT_LOG_MAX_BYTES),
            nats,
            git,
            stream: file.stream.clone(),
            blob: file.blob.clone(),
            lock_lease: file.lock_lease_ms.map(Duration::from_millis).unwrap_or(crate::lock::DEFAULT_LEASE),
            metrics_listen: file.metrics_listen,
        })
    }
}

/// Makes a path absolute without resolving symlinks or requiring it to exist.
pub fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("cannot make {} absolute", path.display()))
}

/// The machine's host name, the default node id.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buffer of the given length; gethostname NUL-terminates within it on success.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0 {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        if let Ok(name) = std::str::from_utf8(&buf[..end]) {
            if !name.is_empty() {
                return name.to_string();
            }
        }
    }
    "localhost".into()
}

/// `$XDG_STATE_HOME/syncfs/<mount point, escaped>`, or `~/.local/state/syncfs/...`.
pub fn default_state_dir(mountpoint: &Path) -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let home = std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .ok_or_else(|| anyhow!("neither XDG_STATE_HOME nor HOME is set; pass --state DIR"))?;
            PathBuf::from(home).join(".local/state")
        }
    };
    Ok(base.join("syncfs").join(escape_path(mountpoint)))
}

/// A path as one file name: `/` becomes `-`, anything but `[A-Za-z0-9._]` becomes `_xx`.
pub fn escape_path(path: &Path) -> String {
    let text = path.to_string_lossy();
    let trimmed = text.trim_matches('/');
    if trimmed.is_empty() {
        return "-".into();
    }
    let mut out = String::new();
    for byte in trimmed.bytes() {
        match byte {
            b'/' => out.push('-'),
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' => out.push(byte as char),
            b'_' => out.push_str("__"),
            other => out.push_str(&format!("_{other:02x}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_is_injective_on_common_cases() {
        assert_eq!(escape_path(Path::new("/mnt/sync")), "mnt-sync");
        assert_eq!(escape_path(Path::new("/mnt/a-b")), "mnt-a_2db");
        assert_eq!(escape_path(Path::new("/mnt/a_b")), "mnt-a__b");
        assert_ne!(escape_path(Path::new("/a/b")), escape_path(Path::new("/a-b")));
        assert_eq!(escape_path(Path::new("/")), "-");
    }

    #[test]
    fn config_keys_parse_and_unknown_keys_fail_with_lines() {
        let cfg = FileConfig::parse(
            "node: n1\nallow_other: true\nfuse:\n  threads: 2\n  passthrough: false\n  cache_ttl_ms: 50\n",
            Path::new("/etc/syncfs.yml"),
        )
        .unwrap();
        assert_eq!(cfg.node.as_deref(), Some("n1"));
        assert_eq!(cfg.allow_other, Some(true));
        assert_eq!((cfg.threads, cfg.passthrough, cfg.cache_ttl_ms), (Some(2), Some(false), Some(50)));

        let e = FileConfig::parse("node: n1\nfuse:\n  thread: 2\n", Path::new("c.yml")).unwrap_err();
        assert!(e.to_string().starts_with("c.yml:3:3: unknown key `fuse.thread`"), "{e}");
        let e = FileConfig::parse("allow_other: sure\n", Path::new("c.yml")).unwrap_err();
        assert!(e.to_string().starts_with("c.yml:1:14:"), "{e}");
        let e = FileConfig::parse("fuse:\n  threads: 0\n", Path::new("c.yml")).unwrap_err();
        assert!(e.to_string().contains("between 1 and 64"), "{e}");
    }

    #[test]
    fn nats_keys_parse_and_secrets_do_not_print() {
        let cfg = FileConfig::parse(
            "nats:\n  url: [nats://a:4222, nats://b:4222]\n  user: u\n  password: hunter2\n  kv: {replicas: 3, history: 2}\n  tls: {ca: ca.pem, required: true}\n  timeout_ms: 1500\n",
            Path::new("/etc/syncfs/c.yml"),
        )
        .unwrap();
        assert_eq!(cfg.nats.urls, vec!["nats://a:4222", "nats://b:4222"]);
        assert_eq!((cfg.nats.replicas, cfg.nats.history), (3, 2));
        assert_eq!(cfg.nats.tls_ca, Some(PathBuf::from("/etc/syncfs/ca.pem")));
        assert_eq!(cfg.nats.timeout, Duration::from_millis(1500));
        assert!(!format!("{cfg:?}").contains("hunter2"));
        let e = FileConfig::parse("nats:\n  kv: {replicas: 9}\n", Path::new("c.yml")).unwrap_err();
        assert!(e.to_string().contains("between 1 and 5"), "{e}");
        let e = FileConfig::parse("nats:\n  passwd: x\n", Path::new("c.yml")).unwrap_err();
        assert!(e.to_string().starts_with("c.yml:2:3: unknown key `nats.passwd`"), "{e}");
    }

    #[test]
    fn stream_blob_and_cache_keys_parse() {
        let cfg = FileConfig::parse(
            "nats:\n  stream: {max_bytes: 1048576, max_msgs: 10, replicas: 3}\n  object_store:\n    bucket: team_blobs\n    chunk_bytes: 65536\n    gc_interval_ms: 500\n    gc_grace_ms: 1000\ncache:\n  max_bytes: 1073741824\n",
            Path::new("c.yml"),
        )
        .unwrap();
        assert_eq!((cfg.stream.max_bytes, cfg.stream.max_msgs, cfg.stream.replicas), (Some(1 << 20), Some(10), 3));
        assert_eq!((cfg.blob.bucket.as_str(), cfg.blob.chunk_bytes), ("team_blobs", 65536));
        assert_eq!((cfg.blob.gc_interval, cfg.blob.gc_grace), (Duration::from_millis(500), Duration::from_secs(1)));
        assert_eq!(cfg.blob.cache_max_bytes, 1 << 30);
        let defaults = FileConfig::parse("node: x\n", Path::new("c.yml")).unwrap();
        assert_eq!(defaults.stream, StreamSettings::default());
        assert_eq!(defaults.blob, BlobSettings::default());
        let cases = [
            ("nats:\n  stream: {max_msgs: 0}\n", "c.yml:2:22: `nats.stream.max_msgs` must be a positive number"),
            ("nats:\n  stream:\n    max_age: 3\n", "c.yml:3:5: unknown key `nats.stream.max_age`"),
            ("nats:\n  object_store: {bucket: a.b}\n", "may hold only letters"),
            ("nats:\n  object_store: {chunk_bytes: 12}\n", "between 1024 and 8388608"),
            ("cache:\n  size: 3\n", "c.yml:2:3: unknown key `cache.size`"),
            ("cache:\n  max_bytes: lots\n", "`cache.max_bytes` must be a whole number"),
        ];
        for (text, msg) in cases {
            let e = FileConfig::parse(text, Path::new("c.yml")).unwrap_err();
            assert!(e.to_string().contains(msg), "{text:?}: {e}");
        }
    }

    #[test]
    fn relative_paths_in_the_file_are_relative_to_it() {
        let cfg = FileConfig::parse("state: st\npolicies_seed: p.yml\n", Path::new("/etc/syncfs/c.yml")).unwrap();
        assert_eq!(cfg.state, Some(PathBuf::from("/etc/syncfs/st")));
        assert_eq!(cfg.policies_seed, Some(PathBuf::from("/etc/syncfs/p.yml")));
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.yml");
        std::fs::write(&file, "node: from-file\nstate: st\n").unwrap();
        let flags = MountFlags {
            mountpoint: "/mnt/x".into(),
            config: Some(file.clone()),
            node: Some("from-flag".into()),
            ..Default::default()
        };
        let cfg = MountConfig::resolve(&flags).unwrap();
        assert_eq!(cfg.node, "from-flag");
        assert_eq!(cfg.state_dir, dir.path().join("st"));
        let git = MountFlags {
            mountpoint: "/mnt/x".into(),
            git_remote: Some("/srv/git".into()),
            config: Some(file.clone()),
            ..Default::default()
        };
        assert_eq!(MountConfig::resolve(&git).unwrap().git.remote.as_deref(), Some("/srv/git"));
        let nats = MountFlags {
            mountpoint: "/mnt/x".into(),
            nats: vec!["nats://a:4222".into(), "nats://b:4222".into()],
            config: Some(file),
            ..Default::default()
        };
        assert_eq!(MountConfig::resolve(&nats).unwrap().nats.urls.len(), 2);
    }
}
