//! The embedded default: a private `nats-server -js` on loopback, owned by the mount.
//!
//! Started when no NATS URL is configured, with its store under `--state/nats`, bound to
//! 127.0.0.1 unless `--listen HOST[:PORT]` names another address (for nodes on other
//! machines). Off loopback it requires the config's credentials (a user and password, or a
//! token), which become the server's authorization: an open JetStream on a network would let
//! anyone rewrite the cluster's files. It keeps the port it had last time when that port is free, so a second
//! node that joined with `--nats` finds it again after a remount. The server dies with the
//! daemon (`PR_SET_PDEATHSIG`), and a server left over from a daemon that was killed is stopped
//! before a new one starts on the same store.

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

use super::{parse_version, MIN_VERSION};

/// A running private nats-server, started again by its supervisor thread whenever it exits
/// while the mount lives (a crash, an OOM kill, an operator's `kill`): the daemon's clients
/// reconnect to the same port and store, so nothing acknowledged is lost.
#[derive(Debug)]
pub struct Embedded {
    /// Its client URL.
    pub url: String,
    dir: PathBuf,
    child: Arc<Mutex<Option<Child>>>,
    stopping: Arc<AtomicBool>,
    supervisor: Option<std::thread::JoinHandle<()>>,
}

/// How to start the server: the same every time, so that a restart keeps port and store.
#[derive(Clone)]
struct Spec {
    bin: PathBuf,
    dir: PathBuf,
    /// The address it binds.
    host: IpAddr,
    port: u16,
    name: String,
    /// The `authorization { ... }` block of its config, if any (holds secrets).
    auth: Option<String>,
}

impl std::fmt::Debug for Spec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spec").field("dir", &self.dir).field("host", &self.host).field("port", &self.port).finish_non_exhaustive()
    }
}

/// Where a client on this machine reaches a server bound to `host`.
fn reach(host: IpAddr) -> IpAddr {
    if host.is_unspecified() {
        if host.is_ipv4() { IpAddr::from([127, 0, 0, 1]) } else { IpAddr::from(std::net::Ipv6Addr::LOCALHOST) }
    } else {
        host
    }
}

/// `HOST` or `HOST:PORT` (`[V6]:PORT`), as `--listen` takes it.
pub fn parse_listen(text: &str) -> anyhow::Result<(IpAddr, Option<u16>)> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok((addr.ip(), Some(addr.port()).filter(|p| *p != 0)));
    }
    let host = text.trim_start_matches('[').trim_end_matches(']');
    host.parse::<IpAddr>().map(|ip| (ip, None)).map_err(|_| {
        anyhow!("--listen {text}: expected an IP address, optionally with a port (0.0.0.0:4222, 10.0.0.5, [::]:4222)")
    })
}

/// The server's `authorization` block from the credentials the config gives, as JSON strings.
fn authorization(settings: &super::NatsSettings) -> anyhow::Result<Option<String>> {
    let q = |s: &str| serde_json::to_string(s).expect("a string serializes");
    Ok(match (&settings.user, &settings.password, &settings.token) {
        (Some(user), Some(password), _) => {
            Some(format!("authorization {{\n  user: {}\n  password: {}\n}}\n", q(user), q(&password.0)))
        }
        (_, _, Some(token)) => Some(format!("authorization {{\n  token: {}\n}}\n", q(&token.0))),
        (Some(_), None, None) | (None, Some(_), None) => bail!("nats.user and nats.password go together"),
        (None, None, None) => None,
    })
}

impl Spec {
    /// Starts the server and waits until it listens.
    fn launch(&self) -> anyhow::Result<Child> {
        let dir = &self.dir;
        let log = dir.join("server.log");
        // `sync_interval: always`: JetStream fsyncs each message before acknowledging it, so
        // an acknowledged write survives a crash of the machine, not only of the daemon.
        let conf = dir.join("server.conf");
        let store = serde_json::to_string(&dir.display().to_string())?;
        let mut text = format!("jetstream {{\n  store_dir: {store}\n  sync_interval: always\n}}\n");
        text.push_str(self.auth.as_deref().unwrap_or(""));
        // Only the daemon's user reads it: it may hold the credentials.
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&conf)
            .with_context(|| format!("cannot write {}", conf.display()))?;
        std::io::Write::write_all(&mut file, text.as_bytes()).with_context(|| format!("cannot write {}", conf.display()))?;
        drop(file);
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-c")
            .arg(&conf)
            .args(["-js", "-a", &self.host.to_string(), "-p", &self.port.to_string(), "-n"])
            .arg(format!("syncfs-{}", self.name))
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("cannot start {}", self.bin.display()))?;
        std::fs::write(dir.join("pid"), child.id().to_string())?;
        std::fs::write(dir.join("port"), self.port.to_string())?;
        let addr = SocketAddr::from((reach(self.host), self.port));
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(child);
            }
            if let Some(status) = child.try_wait()? {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                bail!("the embedded nats-server exited ({status}):\n{}", last_lines(&tail, 10));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the embedded nats-server did not listen on {addr} within 15 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Watches the server and starts it again when it exits, until `stopping`. Runs on the thread
/// that spawns every server, which lives as long as the mount (`PR_SET_PDEATHSIG` follows the
/// spawning thread).
fn supervise(spec: &Spec, child: &Mutex<Option<Child>>, stopping: &AtomicBool) {
    let mut backoff = Duration::from_millis(250);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let exited = {
            let mut slot = child.lock().unwrap_or_else(|e| e.into_inner());
            match slot.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => {
                    slot.take();
                    Some(status.to_string())
                }
                Some(Ok(None)) => None,
                Some(Err(e)) => Some(format!("cannot wait for it: {e}")),
                None => Some("not running".into()),
            }
        };
        let Some(status) = exited else { continue };
        let tail = std::fs::read_to_string(spec.dir.join("server.log")).unwrap_or_default();
        tracing::warn!(%status, log = %last_lines(&tail, 3), "the embedded nats-server exited; starting it again");
        loop {
            if stopping.load(Ordering::SeqCst) {
                return;
            }
            match spec.launch() {
                Ok(c) => {
                    tracing::info!(port = spec.port, "the embedded nats-server runs again");
                    *child.lock().unwrap_or_else(|e| e.into_inner()) = Some(c);
                    backoff = Duration::from_millis(250);
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "cannot start the embedded nats-server again");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}

fn free_port(host: IpAddr, preferred: Option<u16>) -> anyhow::Result<u16> {
    if let Some(port) = preferred {
        if TcpListener::bind((host, port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(TcpListener::bind((host, 0))?.local_addr()?.port())
}

/// The nats-server binary: `SYNCFS_NATS_SERVER`, else `nats-server` on the PATH (or in
/// /usr/local/bin, /usr/bin when the PATH has none), checked to be new enough.
fn server_binary() -> anyhow::Result<PathBuf> {
    // mount(8) runs its helpers with PATH=/sbin:/bin:/usr/sbin:/usr/bin: fstab mounts must
    // find the server where scripts/install-deps.sh puts it too.
    let on_path = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("nats-server").is_file()));
    let bin = std::env::var_os("SYNCFS_NATS_SERVER").map(PathBuf::from).unwrap_or_else(|| {
        let fallback = ["/usr/local/bin/nats-server", "/usr/bin/nats-server"].iter().map(PathBuf::from).find(|p| p.is_file());
        match fallback {
            Some(p) if !on_path => p,
            _ => PathBuf::from("nats-server"),
        }
    });
    let out = Command::new(&bin).arg("--version").output().map_err(|e| {
        anyhow!(
            "cannot run {} ({e}): the embedded default needs nats-server {}.{} or newer \
             (scripts/install-deps.sh installs it), or pass --nats URL",
            bin.display(),
            MIN_VERSION.0,
            MIN_VERSION.1
        )
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.trim().trim_start_matches("nats-server: ").trim_start_matches('v');
    match parse_version(version) {
        Some(v) if v >= MIN_VERSION => Ok(bin),
        _ => bail!(
            "{} is version {version}; syncfs needs nats-server {}.{} or newer \
             (scripts/install-deps.sh installs one from Debian's newer suites)",
            bin.display(),
            MIN_VERSION.0,
            MIN_VERSION.1
        ),
    }
}

/// Stops a server a killed daemon left running on this store.
fn stop_leftover(dir: &Path) {
    let Ok(pid) = std::fs::read_to_string(dir.join("pid")) else {
        return;
    };
    let Ok(pid) = pid.trim().parse::<i32>() else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let ours = String::from_utf8_lossy(&cmdline).contains(&*dir.to_string_lossy());
    if ours && crate::daemon::process_alive(pid as u32) {
        tracing::info!(pid, "stopping a nats-server left by an earlier daemon");
        // SAFETY: signalling a process we identified as our own leftover server.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while crate::daemon::process_alive(pid as u32) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if crate::daemon::process_alive(pid as u32) {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

impl Embedded {
    /// Starts a server with its store in `dir`, and the thread that starts it again whenever
    /// it exits until [`Embedded::stop`].
    pub fn start(dir: &Path, node: &str, settings: &super::NatsSettings) -> anyhow::Result<Embedded> {
        let (host, asked_port) = match &settings.listen {
            Some(text) => parse_listen(text)?,
            None => (IpAddr::from([127, 0, 0, 1]), None),
        };
        let auth = authorization(settings)?;
        if !host.is_loopback() && auth.is_none() {
            bail!(
                "--listen {host} opens the embedded NATS server to the network: give it credentials \
                 (nats.user and nats.password, or nats.token, in the config; or SYNCFS_NATS_USER and \
                 SYNCFS_NATS_PASSWORD, or SYNCFS_NATS_TOKEN); every node then uses the same"
            );
        }
        let bin = server_binary()?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        stop_leftover(dir);
        let previous = std::fs::read_to_string(dir.join("port"))
            .ok()
            .and_then(|p| p.trim().parse().ok());
        let port = match asked_port {
            // A port asked for is that port or nothing: other machines were told it.
            Some(port) => {
                TcpListener::bind((host, port)).with_context(|| format!("cannot listen on {host}:{port}"))?;
                port
            }
            None => free_port(host, previous)?,
        };
        let name: String = node
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' })
            .collect();
        let spec = Spec { bin, dir: dir.to_path_buf(), host, port, name, auth };
        let child = Arc::new(Mutex::new(None));
        let stopping = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let supervisor = {
            let (spec, child, stopping) = (spec.clone(), child.clone(), stopping.clone());
            std::thread::Builder::new().name("nats-server".into()).spawn(move || {
                match spec.launch() {
                    Ok(c) => {
                        *child.lock().unwrap_or_else(|e| e.into_inner()) = Some(c);
                        let _ = tx.send(Ok(()));
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
                supervise(&spec, &child, &stopping);
            })?
        };
        rx.recv().map_err(|_| anyhow!("the embedded nats-server's thread ended"))??;
        let url = format!("nats://{}", SocketAddr::from((reach(host), port)));
        if !host.is_loopback() {
            tracing::info!(listen = %SocketAddr::from((host, port)), "the embedded nats-server listens beyond this machine; other nodes join with --nats nats://<this machine's address>:{port}");
        }
        tracing::info!(%url, store = %dir.display(), "embedded nats-server started");
        Ok(Embedded {
            url,
            dir: dir.to_path_buf(),
            child,
            stopping,
            supervisor: Some(supervisor),
        })
    }

    /// Stops the server (gracefully, then by force after 10 s).
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(t) = self.supervisor.take() {
            let _ = t.join();
        }
        let Some(mut child) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                let _ = std::fs::remove_file(self.dir.join("pid"));
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
