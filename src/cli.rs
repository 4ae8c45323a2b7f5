//! The command line (SPEC section 1).

use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};

use crate::config::{FileConfig, MountConfig, MountFlags};
use crate::daemon::{self, MountState};
use crate::policy::{Origin, PolicyTable, POLICY_FILE};
use crate::status::POLICIES_XATTR;

/// A FUSE filesystem that syncs each path with the consistency its policy asks for.
#[derive(Debug, Parser)]
#[command(name = "syncfs", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Mount a sync root. Returns once the filesystem answers (or fails, leaving nothing mounted).
    Mount {
        /// Where the sync root appears (an existing directory).
        mountpoint: PathBuf,
        /// This node's private state [default: $XDG_STATE_HOME/syncfs/<mount point>].
        #[arg(long, value_name = "DIR")]
        state: Option<PathBuf>,
        /// A config file (YAML; docs/CONFIGURATION.md lists its keys).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// NATS server URL (repeatable). Absent: an embedded private server.
        #[arg(long, value_name = "URL")]
        nats: Vec<String>,
        /// The durable tier's shared git remote.
        #[arg(long, value_name = "URL")]
        git_remote: Option<String>,
        /// This node's name [default: the host name].
        #[arg(long, value_name = "ID")]
        node: Option<String>,
        /// Where the embedded NATS server listens, `HOST[:PORT]`, so that nodes on other
        /// machines can join with `--nats nats://HOST:PORT` [default: 127.0.0.1 only]. Off
        /// loopback, the credentials of the config (nats.user/password or nats.token) are
        /// required and become the server's.
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// Stay in the foreground, logging to stderr.
        #[arg(long)]
        foreground: bool,
        /// Mount options, comma-separated: allow_other.
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
    },
    /// Unmount, waiting for the daemon to finish its work. Also cleans up a stale mount.
    Umount {
        /// The mount point.
        mountpoint: PathBuf,
    },
    /// Show a mount's node, connections, pending writes and conflicts.
    Status {
        /// The mount point.
        mountpoint: PathBuf,
        /// Print the stable JSON form.
        #[arg(long)]
        json: bool,
    },
    /// Follow changes as they happen on this node and as other nodes' changes arrive.
    Watch {
        /// Only paths matching one of these globs (relative to the sync root; `**` crosses
        /// directories). None: every path.
        globs: Vec<String>,
        /// The mount [default: the syncfs mount holding the current directory].
        #[arg(long, value_name = "MOUNTPOINT")]
        mount: Option<PathBuf>,
        /// Print each event as its JSON line (the format of `.syncfs/events`).
        #[arg(long)]
        json: bool,
        /// Start with the events the feed still holds, not only new ones.
        #[arg(long)]
        all: bool,
    },
    /// Work with policy tables.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Started by the daemon: aborts its FUSE connection if it dies without unmounting.
    #[command(hide = true)]
    Guard {
        pid: u32,
        mount_id: u64,
        minor: u32,
        mountpoint: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Show which rule, tier and consistency govern a path.
    Explain {
        /// A path relative to the sync root (or an absolute path inside --mount).
        path: PathBuf,
        /// A policy file, or a config file whose policies_seed names one.
        #[arg(long, value_name = "FILE", conflicts_with = "mount")]
        config: Option<PathBuf>,
        /// Use the table a running mount applies.
        #[arg(long, value_name = "MOUNTPOINT")]
        mount: Option<PathBuf>,
    },
    /// Validate a policy file; prints file:line:column and the reason of the first problem.
    Check {
        /// The policy file.
        file: PathBuf,
    },
}

/// The name `mount(8)` runs for `-t fuse.syncfs` (fstab), when linked to this binary.
pub const MOUNT_HELPER: &str = "mount.fuse.syncfs";

/// Runs the command line; the process exit code.
pub fn main() -> ExitCode {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if Path::new(&argv0).file_name().is_some_and(|n| n == MOUNT_HELPER) {
        return match mount_helper(std::env::args().skip(1).collect()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("syncfs: {e:#}");
                // mount(8)'s "mount failure".
                ExitCode::from(32)
            }
        };
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("syncfs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Mount {
            mountpoint,
            state,
            config,
            nats,
            git_remote,
            node,
            listen,
            foreground,
            options,
        } => {
            let mut allow_other = false;
            for opt in options.iter().flat_map(|o| o.split(',')) {
                match opt.trim() {
                    "allow_other" => allow_other = true,
                    "" => {}
                    other => bail!("unknown mount option `{other}` (supported: allow_other)"),
                }
            }
            let flags = MountFlags {
                mountpoint,
                state,
                config,
                nats,
                git_remote,
                node,
                allow_other,
                listen,
            };
            let cfg = MountConfig::resolve(&flags)?;
            daemon::mount(cfg, foreground)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Guard { pid, mount_id, minor, mountpoint } => {
            crate::guard::run(pid, crate::guard::MountId { id: mount_id, minor }, &mountpoint)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Umount { mountpoint } => {
            daemon::umount(&mountpoint)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { mountpoint, json } => {
            let mountpoint = crate::config::absolute(&mountpoint)?;
            // Exit codes (docs/OPERATIONS.md): 0 healthy, 1 degraded, 2 not a running mount.
            let not_running = |message: String| {
                eprintln!("syncfs: {message}");
                Ok(ExitCode::from(2))
            };
            match daemon::probe(&mountpoint) {
                Ok(MountState::Syncfs(status)) => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&status)?);
                    } else {
                        print!("{}", status.render());
                    }
                    let healthy = status.problems(std::time::SystemTime::now()).is_empty();
                    Ok(if healthy { ExitCode::SUCCESS } else { ExitCode::from(1) })
                }
                Ok(MountState::Stale) => not_running(daemon::stale_message(&mountpoint)),
                Ok(MountState::NotMounted) => not_running(format!("{} is not mounted", mountpoint.display())),
                Ok(MountState::OtherMount) => not_running(format!("{} is not a syncfs mount", mountpoint.display())),
                Err(e) => not_running(format!("{}: {e:#}", mountpoint.display())),
            }
        }
        Command::Watch { globs, mount, json, all } => {
            let mountpoint = match mount {
                Some(m) => crate::config::absolute(&m)?,
                None => find_mount(&std::env::current_dir()?)?,
            };
            watch(&mountpoint, &globs, json, all)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy {
            command: PolicyCommand::Check { file },
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let table = match PolicyTable::parse(&text, &file) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            let rules = table
                .policies()
                .iter()
                .filter(|p| matches!(p.origin, Origin::File { .. }))
                .count();
            println!("{}: ok ({rules} rules)", file.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy {
            command: PolicyCommand::Explain { path, config, mount },
        } => {
            let (table, source) = explain_table(config.as_deref(), mount.as_deref())?;
            let rel = relative_path(&path, mount.as_deref())?;
            print!("{}", explain(&table, &source, &rel));
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `mount.fuse.syncfs SOURCE MOUNTPOINT [-o OPTIONS] [-n] [-s] [-f] [-v]`, as `mount(8)`
/// calls it for an fstab line `SOURCE MOUNTPOINT fuse.syncfs OPTIONS 0 0`. SOURCE is a
/// config file when it names one (else a label, ignored). syncfs's options: `config=FILE`,
/// `state=DIR`, `node=ID`, `nats=URL` (repeatable), `git_remote=URL`, `listen=ADDR`,
/// `allow_other`; the generic ones mount(8) and systemd use (`defaults`, `rw`, `noauto`,
/// `nofail`, `_netdev`, `x-systemd.*`, ...) are left to them. Mounts in the background and
/// returns once the filesystem answers, like `syncfs mount`.
fn mount_helper(args: Vec<String>) -> anyhow::Result<()> {
    let mut positional = Vec::new();
    let mut options = Vec::new();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-o" => options.extend(it.next().ok_or_else(|| anyhow!("-o needs options"))?.split(',').map(str::to_string)),
            // Fake (-f), no mtab (-n), sloppy (-s), verbose (-v): nothing to do differently.
            "-f" => return Ok(()),
            "-n" | "-s" | "-v" => {}
            a if a.starts_with("-o") => options.extend(a[2..].split(',').map(str::to_string)),
            a if a.starts_with('-') => bail!("{MOUNT_HELPER}: unknown flag {a}"),
            _ => positional.push(arg),
        }
    }
    let [source, mountpoint] = <[String; 2]>::try_from(positional)
        .map_err(|_| anyhow!("usage: {MOUNT_HELPER} SOURCE MOUNTPOINT [-o OPTIONS]"))?;
    let mut flags = MountFlags { mountpoint: PathBuf::from(&mountpoint), ..Default::default() };
    if Path::new(&source).is_file() {
        flags.config = Some(PathBuf::from(&source));
    }
    // The same mount, by the same command line a user would type: `syncfs mount ...`.
    let mut argv: Vec<std::ffi::OsString> = vec!["mount".into(), mountpoint.into()];
    for opt in options.iter().map(|o| o.trim()).filter(|o| !o.is_empty()) {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v.to_string())),
            None => (opt, None),
        };
        let need = |v: Option<String>| v.ok_or_else(|| anyhow!("{MOUNT_HELPER}: option `{key}` needs a value"));
        match key {
            "config" => flags.config = Some(PathBuf::from(need(value)?)),
            "state" => flags.state = Some(PathBuf::from(need(value)?)),
            "node" => flags.node = Some(need(value)?),
            "nats" => flags.nats.push(need(value)?),
            "git_remote" => flags.git_remote = Some(need(value)?),
            "listen" => flags.listen = Some(need(value)?),
            "allow_other" => flags.allow_other = true,
            // mount(8)'s and systemd's own, and FUSE's that syncfs sets itself.
            "defaults" | "rw" | "auto" | "noauto" | "nofail" | "_netdev" | "user" | "users" | "nouser"
            | "suid" | "nosuid" | "dev" | "nodev" | "exec" | "noexec" | "atime" | "noatime" | "relatime"
            | "default_permissions" => {}
            k if k.starts_with("x-") || k.starts_with("comment=") => {}
            other => bail!(
                "{MOUNT_HELPER}: unknown option `{other}` (syncfs takes config=, state=, node=, nats=, \
                 git_remote=, listen=, allow_other)"
            ),
        }
    }
    // Checked here too, so an fstab mistake is reported by mount(8) in its own words.
    MountConfig::resolve(&flags)?;
    let pairs = [
        ("--config", flags.config.map(|p| p.into_os_string())),
        ("--state", flags.state.map(|p| p.into_os_string())),
        ("--node", flags.node.map(Into::into)),
        ("--git-remote", flags.git_remote.map(Into::into)),
        ("--listen", flags.listen.map(Into::into)),
    ];
    for (flag, value) in pairs {
        if let Some(v) = value {
            argv.push(flag.into());
            argv.push(v);
        }
    }
    for url in flags.nats {
        argv.push("--nats".into());
        argv.push(url.into());
    }
    if flags.allow_other {
        argv.push("-o".into());
        argv.push("allow_other".into());
    }
    let exe = std::env::current_exe().context("cannot find the syncfs executable")?;
    let status = std::process::Command::new(exe).args(&argv).status().context("cannot run syncfs mount")?;
    if !status.success() {
        bail!("syncfs mount failed ({status})");
    }
    Ok(())
}

/// The syncfs mount holding `dir`: the nearest directory up from it that is a mount's root.
fn find_mount(dir: &Path) -> anyhow::Result<PathBuf> {
    let mut at = Some(dir);
    while let Some(d) = at {
        if let Ok(MountState::Syncfs(_)) = daemon::probe(d) {
            return Ok(d.to_path_buf());
        }
        at = d.parent();
    }
    bail!("{} is not inside a syncfs mount; give --mount", dir.display())
}

/// `syncfs watch`: follows the mount's `.syncfs/events` (from its end, or its start with
/// `all`) and prints the events whose path matches a glob. Runs until interrupted.
fn watch(mountpoint: &Path, globs: &[String], json: bool, all: bool) -> anyhow::Result<()> {
    use std::io::{BufRead, Seek, SeekFrom, Write};
    let mut set = globset::GlobSetBuilder::new();
    for g in globs {
        let glob = globset::GlobBuilder::new(g)
            .literal_separator(true)
            .build()
            .with_context(|| format!("invalid glob `{g}`"))?;
        set.add(glob);
    }
    let set = set.build()?;
    let path = mountpoint.join(crate::events::EVENTS_FILE);
    let file = std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut reader = std::io::BufReader::new(file);
    let mut at = if all { 0 } else { reader.seek(SeekFrom::End(0))? };
    let mut line = String::new();
    let stdout = std::io::stdout();
    loop {
        let len = reader.get_ref().metadata()?.len();
        if len < at {
            // The feed was emptied (it passed its size limit): go on from its start.
            at = reader.seek(SeekFrom::Start(0))?;
        }
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n == 0 || !line.ends_with('\n') {
            // Nothing new, or a line still being written: read it whole later.
            reader.seek(SeekFrom::Start(at))?;
            std::thread::sleep(std::time::Duration::from_millis(100));
            continue;
        }
        at += n as u64;
        let Ok(event) = serde_json::from_str::<crate::events::Event>(line.trim_end()) else { continue };
        if !globs.is_empty() && !set.is_match(&event.path) && !event.to.as_deref().is_some_and(|t| set.is_match(t)) {
            continue;
        }
        let mut out = stdout.lock();
        let written = if json {
            out.write_all(line.as_bytes())
        } else {
            writeln!(out, "{}", render_event(&event))
        };
        if written.and_then(|()| out.flush()).is_err() {
            // A closed pipe (`syncfs watch | head`): done.
            return Ok(());
        }
    }
}

/// One event as `syncfs watch` prints it.
pub fn render_event(e: &crate::events::Event) -> String {
    let node = e.node.as_deref().unwrap_or("?");
    let path = match &e.to {
        Some(to) => format!("{} -> {to}", e.path),
        None => e.path.clone(),
    };
    let mut text = format!("{} {node} {} {} {path} ({})", e.time, e.origin, e.op, e.tier);
    if let Some(rev) = &e.rev {
        text.push_str(&format!(" rev {rev}"));
    }
    text
}

/// The table `policy explain` uses, and a name for where it came from.
fn explain_table(config: Option<&Path>, mount: Option<&Path>) -> anyhow::Result<(PolicyTable, String)> {
    if let Some(mp) = mount {
        let mp = crate::config::absolute(mp)?;
        let bytes = daemon::get_xattr(&mp, POLICIES_XATTR)
            .map_err(|e| anyhow!("{} is not a running syncfs mount: {e}", mp.display()))?;
        let name = mp.join(POLICY_FILE);
        let text = String::from_utf8(bytes)?;
        let table = PolicyTable::parse(&text, &name)?;
        return Ok((table, format!("{} (as mounted)", name.display())));
    }
    if let Some(file) = config {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let looks_like_policies = crate::yaml::parse(&text)
            .ok()
            .flatten()
            .is_some_and(|root| root.get("policies").is_some());
        if looks_like_policies {
            return Ok((PolicyTable::parse(&text, file)?, file.display().to_string()));
        }
        let cfg = FileConfig::load(file)?;
        if let Some(seed) = cfg.policies_seed {
            let text = std::fs::read_to_string(&seed)
                .with_context(|| format!("cannot read {}", seed.display()))?;
            return Ok((PolicyTable::parse(&text, &seed)?, seed.display().to_string()));
        }
    }
    Ok((PolicyTable::default_table(), "the built-in default table".into()))
}

/// A path relative to the sync root, `/`-separated, without `.` components.
fn relative_path(path: &Path, mount: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = if path.is_absolute() {
        let Some(mp) = mount else {
            bail!("{} is absolute; give a path relative to the sync root, or --mount", path.display());
        };
        let mp = crate::config::absolute(mp)?;
        path.strip_prefix(&mp)
            .map_err(|_| anyhow!("{} is not inside {}", path.display(), mp.display()))?
            .to_path_buf()
    } else {
        path.to_path_buf()
    };
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            _ => bail!("{} leaves the sync root", path.display()),
        }
    }
    Ok(out)
}

/// The text `policy explain` prints.
pub fn explain(table: &PolicyTable, source: &str, path: &Path) -> String {
    let p = table.resolve(path);
    let rule = match &p.origin {
        Origin::File { line } => format!("\"{}\" ({source}, line {line})", p.pattern),
        Origin::Builtin(name) => format!("\"{}\" (built-in {name} rule)", p.pattern),
    };
    let ttl = p.ttl.map(|t| format!("{} s", t.as_secs())).unwrap_or_else(|| "none".into());
    let rules = if p.merge_rules.is_empty() {
        "none".to_string()
    } else {
        p.merge_rules
            .iter()
            .map(|(field, rule)| format!("{field}={}", rule.name()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let retention = p
        .max_age
        .map(|d| format!("{} days", d.as_secs() / 86_400))
        .unwrap_or_else(|| "none".into());
    let mut text = format!(
        "path:        {}\nrule:        {rule}\ntier:        {}\nconsistency: {}\nttl:         {ttl}\nephemeral:   {}\nmerge rules: {rules}\nschema:      {}\nretention:   {retention}\n",
        path.display(),
        p.tier,
        p.consistency,
        if p.ephemeral { "yes" } else { "no" },
        p.schema.as_deref().unwrap_or("none"),
    );
    if p.tier == crate::policy::TierKind::NatsStream {
        let purge = if p.purge { "yes (truncate to zero and unlink empty or remove the file)" } else { "no (truncate and unlink are EPERM)" };
        text.push_str(&format!("purge:       {purge}\n"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explain_names_rule_and_line() {
        let table = PolicyTable::parse(
            "policies:\n  - pattern: \"notes/**\"\n    tier: local\n",
            Path::new("p.yml"),
        )
        .unwrap();
        let text = explain(&table, "p.yml", Path::new("notes/a.md"));
        assert!(text.contains("rule:        \"notes/**\" (p.yml, line 2)"), "{text}");
        assert!(text.contains("tier:        local"), "{text}");
        assert!(text.contains("consistency: none"), "{text}");
        let text = explain(&table, "p.yml", Path::new("x.swp"));
        assert!(text.contains("built-in temp files rule"), "{text}");
    }

    #[test]
    fn relative_paths_are_normalized_and_cannot_escape() {
        assert_eq!(relative_path(Path::new("./a/b"), None).unwrap(), PathBuf::from("a/b"));
        assert!(relative_path(Path::new("../a"), None).is_err());
        assert!(relative_path(Path::new("/a"), None).is_err());
        assert_eq!(
            relative_path(Path::new("/mnt/s/a"), Some(Path::new("/mnt/s"))).unwrap(),
            PathBuf::from("a")
        );
    }
}
