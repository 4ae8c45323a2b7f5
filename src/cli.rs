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

/// Runs the command line; the process exit code.
pub fn main() -> ExitCode {
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
            match daemon::probe(&mountpoint)? {
                MountState::Syncfs(status) => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&status)?);
                    } else {
                        print!("{}", status.render());
                    }
                    Ok(ExitCode::SUCCESS)
                }
                MountState::Stale => bail!("{}", daemon::stale_message(&mountpoint)),
                MountState::NotMounted => bail!("{} is not mounted", mountpoint.display()),
                MountState::OtherMount => bail!("{} is not a syncfs mount", mountpoint.display()),
            }
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
