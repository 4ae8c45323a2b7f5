//! POSIX suites as regression gates: pjdfstest and fsx on the local tier (with and without
//! kernel passthrough), a NATS KV `lww` directory and a git `lww` directory.
//!
//! Each (suite, tier) pair has an expected-failure list, `mount-tests/posix/<suite>-<tier>.txt`,
//! one `<test id>  # <reason>` a line (`#` lines and blank lines are comments). The gate:
//!
//! - a test that fails and is not listed fails the gate, printed with the suite's output for it;
//! - a listed test that passes fails the gate too, so a fix must remove its line and the list
//!   stays an honest account of what does not work (the listed failures are refusals, which do
//!   not depend on timing; fsx runs a fixed seed and number of operations);
//! - a listed id the suite did not run (renamed, skipped) fails the gate, for the same reason.
//!
//! The local tier's lists stay empty: it claims to behave as a local POSIX directory, kernel
//! caches included (pjdfstest checks nlink and ctime after each change, fsx the size after each
//! operation). The synced tiers' lists hold what they deliberately do not store
//! (docs/SEMANTICS.md, docs/errors.md): device nodes, fifos, sockets, symlinks and hard links
//! are `EPERM`, directory renames `EXDEV`, and KV's key and value limits. Both tools are pinned
//! and built by `scripts/install-deps.sh` into [`TOOLS`].

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Mount, Options, LOCAL_TABLE};
use crate::nats::NatsServer;

/// Where `scripts/install-deps.sh` installs the pinned suites (`SYNCFS_POSIX_TOOLS` overrides
/// it, to try other builds).
const TOOLS: &str = "/var/lib/syncfs/tools/bin";

/// The KV tier under test: `posix/**` is last-write-wins in NATS KV, the rest local.
const KV_TABLE: &str = r#"policies:
  - pattern: "posix/**"
    tier: nats-kv
    consistency: lww
  - pattern: "**"
    tier: local
"#;

/// The git tier under test: `posix/**` is durable, last-write-wins, the rest local.
const GIT_TABLE: &str = r#"policies:
  - pattern: "posix/**"
    tier: git
    consistency: lww
  - pattern: "**"
    tier: local
"#;

/// pjdfstest's configuration. The features are those Linux's own file systems have (pjdfstest's
/// own ci/linux-ext4.toml, plus `rename_ctime`, which ext4 and tmpfs do), since the
/// local tier claims to behave as one. `naptime` only has to exceed the timestamp
/// granularity (nanoseconds). The dummy users exist on every Debian (pjdfstest's default,
/// `tests`, does not).
const PJDFSTEST_TOML: &str = r#"[features]
posix_fallocate = {}
rename_ctime = {}
utime_now = {}
utimensat = {}

[settings]
naptime = 0.01
allow_remount = false

[dummy_auth]
entries = [["nobody", "nogroup"], ["daemon", "daemon"]]
"#;

/// One fsx run: a test id, its number of operations on the local tier and on a synced one,
/// and the operation weights of its configuration. Each run mixes reads, writes and
/// truncations (fsx checks the size after every operation, so a stale cached size fails) with
/// one family of operations, so a failure names the family. Synced tiers commit the whole file
/// at every close, fsync and msync, so they get fewer operations; the counts keep each run
/// within seconds.
struct FsxRun {
    /// The id in the expected-failure lists.
    id: &'static str,
    /// Operations on the local tier, and on a synced one.
    ops: [u64; 2],
    /// The weights of the operations it does; every other operation weighs 0.
    weights: &'static [(&'static str, u32)],
}

/// Every operation fsx 0.3.2 weighs. Named in full in each configuration, since fsx's own
/// defaults are not all 0 (reads, writes, mmap and truncations weigh 10).
const FSX_OPS: &[&str] = &[
    "close_open", "read", "write", "mapread", "mapwrite", "invalidate", "truncate", "fsync", "fdatasync",
    "posix_fallocate", "punch_hole", "sendfile", "posix_fadvise", "copy_file_range",
];

/// The fsx runs of every tier.
const FSX_RUNS: &[FsxRun] = &[
    FsxRun {
        id: "rw",
        ops: [10_000, 5_000],
        weights: &[("close_open", 1), ("read", 10), ("write", 10), ("truncate", 2), ("fsync", 1), ("fdatasync", 1)],
    },
    FsxRun {
        id: "mmap",
        ops: [5_000, 2_000],
        weights: &[
            ("close_open", 1), ("read", 5), ("write", 5), ("mapread", 10), ("mapwrite", 10), ("invalidate", 1),
            ("truncate", 2),
        ],
    },
    FsxRun {
        id: "fallocate",
        ops: [10_000, 5_000],
        weights: &[
            ("close_open", 1), ("read", 10), ("write", 10), ("truncate", 2), ("posix_fallocate", 3),
            ("punch_hole", 3),
        ],
    },
    FsxRun {
        id: "copy",
        ops: [10_000, 5_000],
        weights: &[
            ("close_open", 1), ("read", 10), ("write", 10), ("truncate", 2), ("copy_file_range", 3),
            ("sendfile", 3), ("posix_fadvise", 2),
        ],
    },
];

impl FsxRun {
    /// Its fsx.toml.
    fn config(&self) -> String {
        let mut toml = String::from("[weights]\n");
        for op in FSX_OPS {
            let weight = self.weights.iter().find(|(name, _)| name == op).map_or(0, |(_, w)| *w);
            toml.push_str(&format!("{op} = {weight}\n"));
        }
        toml
    }
}

/// fsx's seed: fixed, so every run does the same operations and a failure reproduces with
/// `fsx -S 20260 -N ...`.
const FSX_SEED: u64 = 20260;

/// The longest a suite may run before it counts as hung (a hung mount must fail the test,
/// not stall CI).
const LIMIT: Duration = Duration::from_secs(300);

/// The tiers under test.
#[derive(Clone, Copy, Debug)]
enum Tier {
    /// Every path local, with kernel passthrough (the default).
    Local,
    /// The local tier with `fuse.passthrough: false`: every read and write crosses the daemon,
    /// so sizes and times the kernel caches are the daemon's to keep right.
    LocalNoPassthrough,
    /// `posix/**` in NATS KV, `lww`, on a private nats-server.
    Kv,
    /// `posix/**` in git, `lww`, with the node's local repository.
    Git,
}

impl Tier {
    /// The tier's name in the expected-failure lists' file names.
    fn name(self) -> &'static str {
        match self {
            Tier::Local => "local",
            Tier::LocalNoPassthrough => "local-nopassthrough",
            Tier::Kv => "kv",
            Tier::Git => "git",
        }
    }
}

/// A mount whose `posix` directory is on the tier under test. Fields drop in order: the mount
/// before the NATS server it uses, so unmounting never waits on a dead server.
struct Target {
    /// The mount.
    mount: Mount,
    /// The KV tier's server, kept until the mount is gone.
    _nats: Option<NatsServer>,
    /// What `posix` is on.
    tier: Tier,
}

impl Target {
    /// Mounts with `allow_other`, since pjdfstest's permission tests switch users.
    fn mount(tier: Tier) -> Target {
        let nats = matches!(tier, Tier::Kv).then(NatsServer::start);
        let table = match tier {
            Tier::Local | Tier::LocalNoPassthrough => LOCAL_TABLE,
            Tier::Kv => KV_TABLE,
            Tier::Git => GIT_TABLE,
        };
        let mount = Mount::with(Options {
            allow_other: true,
            policies: Some(table.into()),
            nats: nats.iter().map(NatsServer::url).collect(),
            config: matches!(tier, Tier::LocalNoPassthrough).then(|| "fuse:\n  passthrough: false\n".into()),
            ..Default::default()
        });
        // The two local variants differ only in passthrough: make sure they do.
        if matches!(tier, Tier::Local | Tier::LocalNoPassthrough) {
            let passthrough = mount.status()["fuse"]["passthrough"].as_bool();
            let expected = Some(matches!(tier, Tier::Local));
            assert_eq!(passthrough, expected, "fuse.passthrough of the {tier:?} mount");
        }
        std::fs::create_dir_all(mount.path("posix")).unwrap();
        Target { mount, _nats: nats, tier }
    }

    /// The directory the suites run in.
    fn dir(&self) -> PathBuf {
        self.mount.path("posix")
    }

    /// A scratch directory outside the mount (on the base's own file system).
    fn scratch(&self, name: &str) -> PathBuf {
        let dir = self.mount.base.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}

/// What one test of a suite did.
#[derive(Debug)]
enum Outcome {
    /// It passed.
    Pass,
    /// It failed; the suite's output for it.
    Fail(String),
    /// The suite did not run it (a feature or setting it needs is off).
    Skip,
}

/// A suite tool's path, failing loudly when it is missing (never skipping the gate).
fn tool(name: &str) -> PathBuf {
    let dir = std::env::var("SYNCFS_POSIX_TOOLS").unwrap_or_else(|_| TOOLS.into());
    let path = Path::new(&dir).join(name);
    assert!(path.exists(), "{} is missing: scripts/install-deps.sh installs it", path.display());
    path
}

/// Runs `cmd` with stdout and stderr into one file (no pipe to fill up), killing it after
/// [`LIMIT`]. Returns whether it exited 0, its output, and how long it ran.
fn run(mut cmd: Command, log: &Path) -> (bool, String, Duration) {
    let out = File::create(log).unwrap();
    cmd.stdin(Stdio::null()).stdout(out.try_clone().unwrap()).stderr(out);
    // Colours and backtraces would only clutter the output the gate parses and prints.
    cmd.env("NO_COLOR", "1").env_remove("RUST_BACKTRACE").env_remove("RUST_LOG");
    let started = Instant::now();
    let mut child = cmd.spawn().expect("spawn suite");
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} still ran after {LIMIT:?} (a hung mount?); its output:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status.success(), std::fs::read_to_string(log).unwrap_or_default(), started.elapsed())
}

/// An expected-failure list: test id to reason. Missing file: empty list. A line without a
/// reason, or an id listed twice, is an error, so every entry says why it is there.
fn expected(suite: &str, tier: Tier) -> BTreeMap<String, String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("mount-tests/posix")
        .join(format!("{suite}-{}.txt", tier.name()));
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let mut list = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (id, reason) = line.split_once('#').unwrap_or((line, ""));
        let (id, reason) = (id.trim(), reason.trim());
        assert!(
            !reason.is_empty() && !id.contains(char::is_whitespace),
            "{}:{}: not `<test id>  # <reason>`: {line}",
            path.display(),
            n + 1
        );
        let again = list.insert(id.to_string(), reason.to_string()).is_some();
        assert!(!again, "{}:{}: {id} is listed twice", path.display(), n + 1);
    }
    list
}

/// The gate: compares a suite's outcomes with its expected-failure list, prints a report,
/// and panics on any difference.
fn gate(suite: &str, tier: Tier, outcomes: &BTreeMap<String, Outcome>, took: Duration) {
    let list = expected(suite, tier);
    let count = |f: fn(&Outcome) -> bool| outcomes.values().filter(|o| f(o)).count();
    let (passed, failed, skipped) = (
        count(|o| matches!(o, Outcome::Pass)),
        count(|o| matches!(o, Outcome::Fail(_))),
        count(|o| matches!(o, Outcome::Skip)),
    );
    eprintln!(
        "posix: {suite} on the {} tier: {passed} passed, {failed} failed ({} listed), {skipped} skipped in {:.1} s",
        tier.name(),
        list.len(),
        took.as_secs_f64()
    );
    let mut problems = Vec::new();
    for (id, outcome) in outcomes {
        match (outcome, list.get(id)) {
            (Outcome::Fail(output), None) => problems.push(format!("FAILED, not expected: {id}\n{output}")),
            (Outcome::Pass, Some(reason)) => {
                problems.push(format!("passes now, remove it from the list: {id}  # {reason}"))
            }
            _ => {}
        }
    }
    for (id, reason) in &list {
        match outcomes.get(id) {
            None => problems.push(format!("listed but not run: {id}  # {reason}")),
            Some(Outcome::Skip) => problems.push(format!("listed but skipped: {id}  # {reason}")),
            _ => {}
        }
    }
    for p in &problems {
        eprintln!("posix: {suite}/{}: {p}", tier.name());
    }
    assert!(
        problems.is_empty(),
        "{suite} on the {} tier differs from mount-tests/posix/{suite}-{}.txt:\n{}",
        tier.name(),
        tier.name(),
        problems.join("\n")
    );
}

/// Parses pjdfstest's output: one line per test, `<id> <padding> <status>`, then tab-indented
/// lines (the failure's message) that belong to it.
fn parse_pjdfstest(output: &str) -> BTreeMap<String, Outcome> {
    const STATUSES: &[&str] = &[" ok", " FAILED", " skipped", " PASSED UNEXPECTEDLY", " failed as expected"];
    let mut outcomes = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in output.lines() {
        if line.starts_with('\t') || line.starts_with(' ') {
            if let Some(Outcome::Fail(text)) = current.as_ref().and_then(|id| outcomes.get_mut(id)) {
                text.push_str(line);
                text.push('\n');
            }
            continue;
        }
        let line = line.trim_end();
        let Some(status) = STATUSES.iter().find(|s| line.ends_with(*s)) else {
            current = None;
            continue;
        };
        let id = line[..line.len() - status.len()].trim();
        if id.is_empty() || id.contains(char::is_whitespace) {
            current = None;
            continue;
        }
        let outcome = match *status {
            " ok" => Outcome::Pass,
            " skipped" => Outcome::Skip,
            _ => Outcome::Fail(String::new()),
        };
        outcomes.insert(id.to_string(), outcome);
        current = Some(id.to_string());
    }
    outcomes
}

/// Runs pjdfstest in the tier's directory and gates its failures.
fn pjdfstest(tier: Tier) {
    let target = Target::mount(tier);
    let conf = target.mount.base.path().join("pjdfstest.toml");
    std::fs::write(&conf, PJDFSTEST_TOML).unwrap();
    let mut cmd = Command::new(tool("pjdfstest"));
    // The secondary file system (for the EXDEV tests) is the base's, which is not the mount.
    cmd.arg("-c").arg(&conf).arg("-p").arg(target.dir()).arg("-s").arg(target.scratch("secondary"));
    let (_, output, took) = run(cmd, &target.mount.base.path().join("pjdfstest.log"));
    // Its exit status only says whether something failed; the gate decides. A run that did not
    // reach its summary (a crash) fails here.
    let summary = output.lines().rev().find(|l| l.starts_with("Summary:"));
    assert!(summary.is_some(), "pjdfstest did not finish:\n{output}");
    let outcomes = parse_pjdfstest(&output);
    assert!(outcomes.len() > 300, "pjdfstest ran only {} tests:\n{output}", outcomes.len());
    eprintln!("posix: pjdfstest/{}: {}", tier.name(), summary.unwrap());
    gate("pjdfstest", target.tier, &outcomes, took);
}

/// Runs every [`FSX_RUNS`] configuration on a file of its own in the tier's directory and
/// gates the failed runs.
fn fsx(tier: Tier) {
    let target = Target::mount(tier);
    let mut outcomes = BTreeMap::new();
    let mut total = Duration::ZERO;
    for fsx_run in FSX_RUNS {
        let (id, ops) = (fsx_run.id, fsx_run.ops[usize::from(matches!(tier, Tier::Kv | Tier::Git))]);
        let conf = target.mount.base.path().join(format!("fsx-{id}.toml"));
        std::fs::write(&conf, fsx_run.config()).unwrap();
        let mut cmd = Command::new(tool("fsx"));
        cmd.arg("-f").arg(&conf);
        cmd.args(["-N", &ops.to_string(), "-S", &FSX_SEED.to_string()]);
        // Its artifacts (the operation log, the expected content) go outside the mount.
        cmd.arg("-P").arg(target.scratch(&format!("fsx-{id}")));
        cmd.arg(target.dir().join(format!("fsx-{id}")));
        let (ok, output, took) = run(cmd, &target.mount.base.path().join(format!("fsx-{id}.log")));
        total += took;
        let status = if ok { "ok" } else { "FAILED" };
        eprintln!("posix: fsx/{}/{id}: {status} in {:.1} s", tier.name(), took.as_secs_f64());
        let outcome = if ok && output.contains("All operations completed A-OK!") {
            Outcome::Pass
        } else {
            // Its operation log ends where it failed; the last lines say what and how.
            let lines: Vec<&str> = output.lines().collect();
            Outcome::Fail(lines[lines.len().saturating_sub(60)..].join("\n"))
        };
        outcomes.insert(id.to_string(), outcome);
    }
    gate("fsx", target.tier, &outcomes, total);
}

/// The local tier passes all of pjdfstest.
#[test]
fn pjdfstest_local() {
    pjdfstest(Tier::Local);
}

/// So does it when the daemon serves every read and write.
#[test]
fn pjdfstest_local_without_passthrough() {
    pjdfstest(Tier::LocalNoPassthrough);
}

/// A KV directory fails only what KV deliberately does not store.
#[test]
fn pjdfstest_kv_lww() {
    pjdfstest(Tier::Kv);
}

/// A git directory fails only what git deliberately does not store.
#[test]
fn pjdfstest_git_lww() {
    pjdfstest(Tier::Git);
}

/// The local tier keeps every byte and size fsx checks.
#[test]
fn fsx_local() {
    fsx(Tier::Local);
}

/// So does it through the daemon.
#[test]
fn fsx_local_without_passthrough() {
    fsx(Tier::LocalNoPassthrough);
}

/// So does a KV directory, committing at every close, fsync and msync.
#[test]
fn fsx_kv_lww() {
    fsx(Tier::Kv);
}

/// So does a git directory.
#[test]
fn fsx_git_lww() {
    fsx(Tier::Git);
}
