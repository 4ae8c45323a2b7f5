//! Mounting real syncfs filesystems for tests, and running ordinary tools on them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The syncfs binary under test: this build's, or `SYNCFS_TEST_BIN` (to show that a test
/// fails on an older build).
pub fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| std::env::var("SYNCFS_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_syncfs").to_string()))
}

/// Mount tests need root and /dev/fuse; fail loudly rather than skip.
pub fn require_fuse() {
    // SAFETY: geteuid cannot fail.
    assert_eq!(unsafe { libc::geteuid() }, 0, "mount tests must run as root (they mount FUSE filesystems with mount(2))");
    assert!(Path::new("/dev/fuse").exists(), "mount tests need /dev/fuse");
}

/// Runs `syncfs ARGS`.
pub fn syncfs(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().expect("run syncfs")
}

/// Runs a bash script in `dir` with `set -euo pipefail`.
pub fn sh_in(dir: &Path, script: &str) -> Output {
    Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail\n{script}"))
        .current_dir(dir)
        .env("SYNCFS", bin())
        .output()
        .expect("run bash")
}

/// Like [`sh_in`], panicking with the script's output when it fails; returns stdout.
pub fn sh_ok_in(dir: &Path, script: &str) -> String {
    let out = sh_in(dir, script);
    assert!(
        out.status.success(),
        "script failed ({}):\n{script}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A table that keeps every path on the node (the local tier): for tests of POSIX behaviour
/// that git or NATS paths deliberately do not have (hard links, symlinks, passthrough).
pub const LOCAL_TABLE: &str = "policies:\n  - pattern: \"**\"\n    tier: local\n";

/// Options of a test mount.
#[derive(Debug, Default, Clone)]
pub struct Options {
    /// `-o allow_other`
    pub allow_other: bool,
    /// Contents of a config file passed with `--config`.
    pub config: Option<String>,
    /// The node id.
    pub node: Option<String>,
    /// NATS URLs (`--nats`); none: the embedded default.
    pub nats: Vec<String>,
    /// A policy table to seed the sync root with (`policies_seed`).
    pub policies: Option<String>,
    /// Environment variables for `syncfs mount`.
    pub env: Vec<(String, String)>,
    /// `--git-remote`
    pub git_remote: Option<String>,
    /// More arguments for `syncfs mount`.
    pub extra: Vec<String>,
}

impl Options {
    /// Every path local (see [`LOCAL_TABLE`]).
    pub fn local() -> Options {
        Options {
            policies: Some(LOCAL_TABLE.into()),
            ..Options::default()
        }
    }
}

/// A mounted syncfs in a temporary directory, unmounted on drop.
pub struct Mount {
    /// Holds the temporary directory.
    pub base: tempfile::TempDir,
    /// The mount point.
    pub mnt: PathBuf,
    /// The state directory.
    pub state: PathBuf,
    mounted: bool,
}

impl Mount {
    /// Mounts with default options (the built-in policy table).
    pub fn start() -> Mount {
        Mount::with(Options::default())
    }

    /// Mounts with every path local.
    pub fn local() -> Mount {
        Mount::with(Options::local())
    }

    /// A mount point and state directory, not mounted yet.
    pub fn prepare() -> Mount {
        require_fuse();
        let base = tempfile::Builder::new().prefix("syncfs-test-").tempdir().expect("tempdir");
        // Other users (the permission tests) must be able to reach the mount point.
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mnt = base.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let state = base.path().join("state");
        Mount {
            base,
            mnt,
            state,
            mounted: false,
        }
    }

    /// Mounts with `opts`, asserting success.
    pub fn with(opts: Options) -> Mount {
        let mut m = Mount::prepare();
        let out = m.try_mount(&opts);
        assert!(
            out.status.success(),
            "syncfs mount failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        m
    }

    /// Runs `syncfs mount` for this mount point and returns its output.
    pub fn try_mount(&mut self, opts: &Options) -> Output {
        let mut args: Vec<String> = vec![
            "mount".into(),
            self.mnt.display().to_string(),
            "--state".into(),
            self.state.display().to_string(),
            "--node".into(),
            opts.node.clone().unwrap_or_else(|| "test-node".into()),
        ];
        if opts.allow_other {
            args.extend(["-o".into(), "allow_other".into()]);
        }
        for url in &opts.nats {
            args.extend(["--nats".into(), url.clone()]);
        }
        if let Some(remote) = &opts.git_remote {
            args.extend(["--git-remote".into(), remote.clone()]);
        }
        args.extend(opts.extra.iter().cloned());
        let mut config = opts.config.clone().unwrap_or_default();
        if let Some(policies) = &opts.policies {
            let path = self.base.path().join("policies.yml");
            std::fs::write(&path, policies).unwrap();
            config.push_str(&format!("\npolicies_seed: {}\n", path.display()));
        }
        if !config.is_empty() {
            let path = self.base.path().join("config.yml");
            std::fs::write(&path, config).unwrap();
            args.extend(["--config".into(), path.display().to_string()]);
        }
        let out = Command::new(bin())
            .args(&args)
            .envs(opts.env.iter().cloned())
            .output()
            .expect("run syncfs");
        self.mounted = out.status.success();
        out
    }

    /// A path inside the mount.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// A path inside the node's materialized tree (the local tier's storage).
    pub fn tree(&self, rel: &str) -> PathBuf {
        self.state.join("tree").join(rel)
    }

    /// Runs a bash script inside the mount.
    pub fn sh(&self, script: &str) -> Output {
        sh_in(&self.mnt, script)
    }

    /// Runs a bash script inside the mount, asserting success; returns stdout.
    pub fn sh_ok(&self, script: &str) -> String {
        sh_ok_in(&self.mnt, script)
    }

    /// The daemon's status as JSON.
    pub fn status(&self) -> serde_json::Value {
        let out = syncfs(&["status", &self.mnt.display().to_string(), "--json"]);
        // 0 healthy, 1 degraded (conflicts, a lost link): both print the document.
        assert!(matches!(out.status.code(), Some(0 | 1)), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.status()["pid"].as_u64().expect("pid") as u32
    }

    /// Unmounts with `syncfs umount`, asserting success and a clean shutdown.
    pub fn umount(&mut self) {
        let out = syncfs(&["umount", &self.mnt.display().to_string()]);
        assert!(out.status.success(), "umount: {}", String::from_utf8_lossy(&out.stderr));
        self.mounted = false;
        self.assert_no_panic();
    }

    /// Fails if the daemon's log shows a panic.
    pub fn assert_no_panic(&self) {
        let log = std::fs::read_to_string(self.state.join("syncfs.log")).unwrap_or_default();
        assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");
    }

    /// Records that the mount is gone by other means (signal, kill).
    pub fn forget_mounted(&mut self) {
        self.mounted = false;
    }
}

impl Mount {
    /// Unmounts with `syncfs umount`, giving up after `secs`: a hung daemon (the bug a test just
    /// caught) never exits, so it is killed and the mount detached, and the next test runs.
    fn umount_within(&self, secs: u64) -> bool {
        let mut child = Command::new(bin())
            .args(["umount", &self.mnt.display().to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("run syncfs umount");
        if wait_for(Duration::from_secs(secs), || child.try_wait().ok().flatten().is_some()) {
            return child.wait().is_ok_and(|s| s.success());
        }
        let pid = std::fs::read_to_string(self.state.join("lock")).unwrap_or_default();
        if let Ok(pid) = pid.trim().parse::<i32>() {
            // SAFETY: signalling this test's own daemon.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        let _ = child.kill();
        let _ = child.wait();
        eprintln!("{}: the daemon did not unmount within {secs} s; killed it", self.mnt.display());
        false
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        if !self.umount_within(60) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        if std::thread::panicking() {
            // The test failed: show what the daemon said.
            let log = std::fs::read_to_string(self.state.join("syncfs.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- last lines of {}:\n{}",
                self.state.join("syncfs.log").display(),
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        } else {
            self.assert_no_panic();
        }
    }
}

/// Whether `path` appears in /proc/mounts.
pub fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let needle = path.display().to_string();
    mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(needle.as_str()))
}

/// Waits until `cond` holds, up to `timeout`.
pub fn wait_for(timeout: Duration, cond: impl FnMut() -> bool) -> bool {
    wait_every(timeout, Duration::from_millis(20), cond)
}

/// Waits until `cond` holds, up to `timeout`, checking every `interval` (for conditions that
/// are costly to check).
pub fn wait_every(timeout: Duration, interval: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(interval);
    }
    cond()
}

/// A mount named `node` on the NATS servers `nats`, with a policy table and a config file.
pub fn node_on(nats: &str, node: &str, policies: &str, config: Option<&str>) -> Mount {
    Mount::with(Options {
        node: Some(node.into()),
        nats: vec![nats.to_string()],
        policies: Some(policies.into()),
        config: config.map(str::to_string),
        ..Default::default()
    })
}

/// Peak resident memory of a process, in KiB (VmHWM).
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM")
}

pub use syncfs::daemon::process_alive;

/// Waits until the file at `path` holds `content` (another node's change arriving).
pub fn wait_content(path: &Path, content: &str) -> bool {
    wait_for(Duration::from_secs(10), || std::fs::read_to_string(path).is_ok_and(|c| c == content))
}

/// Waits until `path` does not exist.
pub fn wait_gone(path: &Path) -> bool {
    wait_for(Duration::from_secs(10), || !path.exists())
}

/// The errno of the last failed libc call.
pub fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}
