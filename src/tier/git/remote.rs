//! The shared remote: fetch, push, and credentials.
//!
//! Credentials come from the config file (`git.username`, `git.password`, `git.ssh_key`,
//! `git.ssh_passphrase`), the environment (`SYNCFS_GIT_USERNAME`, `SYNCFS_GIT_PASSWORD`,
//! `SYNCFS_GIT_SSH_KEY`, `SYNCFS_GIT_SSH_PASSPHRASE`), the URL's user part, or an ssh agent, in
//! that order. They are handed to libgit2 only; every message that may quote the URL is
//! redacted before it reaches a log or `syncfs status`.

use std::cell::Cell;

use git2::{Cred, CredentialType, ErrorCode, FetchOptions, PushOptions, RemoteCallbacks, Repository};

use super::repo::{MAIN, ORIGIN};
use super::GitSettings;
use crate::nats::redact;

/// What a push did.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    /// The remote's branch is now ours.
    Done,
    /// The remote has commits we do not (not a fast-forward): fetch, merge, try again.
    Rejected(String),
}

/// A remote as this node reaches it.
#[derive(Debug, Clone)]
pub struct Remote {
    url: String,
    settings: GitSettings,
    /// The URL without credentials, for messages.
    pub shown: String,
}

/// Credentials tried per operation before giving up (libgit2 asks again after a refusal).
const MAX_CREDENTIAL_TRIES: u32 = 3;

impl Remote {
    /// The remote of `settings`, if one is configured.
    pub fn new(settings: &GitSettings) -> Option<Remote> {
        let url = settings.remote.clone()?;
        Some(Remote {
            shown: redact(&url),
            url,
            settings: settings.clone(),
        })
    }

    /// The URL's password, if it carries one (`https://user:pass@host/...`).
    fn url_password(&self) -> Option<(String, String)> {
        let rest = self.url.split_once("://")?.1;
        let (userinfo, _) = rest.rsplit_once('@')?;
        let (user, pass) = userinfo.split_once(':')?;
        Some((user.to_string(), pass.to_string()))
    }

    fn callbacks<'a>(&'a self, tries: &'a Cell<u32>) -> RemoteCallbacks<'a> {
        let mut cb = RemoteCallbacks::new();
        cb.credentials(move |_url, user_from_url, allowed| {
            tries.set(tries.get() + 1);
            if tries.get() > MAX_CREDENTIAL_TRIES {
                return Err(git2::Error::from_str("the remote refused every credential syncfs has"));
            }
            let s = &self.settings;
            let user = s
                .username
                .clone()
                .or_else(|| user_from_url.map(str::to_string))
                .unwrap_or_else(|| "git".to_string());
            if allowed.contains(CredentialType::SSH_KEY) {
                if let Some(key) = &s.ssh_key {
                    let pass = s.ssh_passphrase.as_ref().map(|p| p.0.as_str());
                    return Cred::ssh_key(&user, None, key, pass);
                }
                return Cred::ssh_key_from_agent(&user);
            }
            if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) {
                if let (Some(u), Some(p)) = (&s.username, &s.password) {
                    return Cred::userpass_plaintext(u, &p.0);
                }
                if let Some(p) = &s.password {
                    return Cred::userpass_plaintext(&user, &p.0);
                }
                if let Some((u, p)) = self.url_password() {
                    return Cred::userpass_plaintext(&u, &p);
                }
            }
            if allowed.contains(CredentialType::USERNAME) {
                return Cred::username(&user);
            }
            if allowed.contains(CredentialType::DEFAULT) {
                return Cred::default();
            }
            Err(git2::Error::from_str("no credentials configured for this remote (see docs/CONFIGURATION.md, git.*)"))
        });
        cb
    }

    /// A libgit2 error as a message safe to show (the URL's credentials removed).
    pub fn describe(&self, e: &git2::Error) -> String {
        let mut message = e.message().to_string();
        if self.url != self.shown {
            message = message.replace(&self.url, &self.shown);
        }
        if let Some((_, pass)) = self.url_password() {
            if !pass.is_empty() {
                message = message.replace(&pass, "***");
            }
        }
        if let Some(p) = &self.settings.password {
            if !p.0.is_empty() {
                message = message.replace(&p.0, "***");
            }
        }
        format!("{}: {message}", self.shown)
    }

    /// Fetches the remote's branch into [`ORIGIN`]. A remote without the branch yet (a new,
    /// empty repository) is not an error: `ORIGIN` just stays absent.
    pub fn fetch(&self, repo: &Repository) -> Result<(), String> {
        let tries = Cell::new(0);
        let mut remote = repo.remote_anonymous(&self.url).map_err(|e| self.describe(&e))?;
        let mut opts = FetchOptions::new();
        opts.remote_callbacks(self.callbacks(&tries));
        opts.download_tags(git2::AutotagOption::None);
        let refspec = format!("+{MAIN}:{ORIGIN}");
        remote
            .fetch(&[refspec.as_str()], Some(&mut opts), Some("syncfs fetch"))
            .map_err(|e| self.describe(&e))
    }

    /// Pushes [`MAIN`] to the remote's branch, never forcing. libgit2 reports success for a
    /// push the remote refused, so each ref's status is checked.
    pub fn push(&self, repo: &Repository) -> Result<Pushed, String> {
        let tries = Cell::new(0);
        let mut remote = repo.remote_anonymous(&self.url).map_err(|e| self.describe(&e))?;
        let rejected: Cell<Option<String>> = Cell::new(None);
        let mut cb = self.callbacks(&tries);
        cb.push_update_reference(|name, status| {
            if let Some(status) = status {
                rejected.set(Some(format!("{name}: {status}")));
            }
            Ok(())
        });
        let mut opts = PushOptions::new();
        opts.remote_callbacks(cb);
        let refspec = format!("{MAIN}:{MAIN}");
        match remote.push(&[refspec.as_str()], Some(&mut opts)) {
            Ok(()) => {}
            Err(e) if e.code() == ErrorCode::NotFastForward => return Ok(Pushed::Rejected(self.describe(&e))),
            Err(e) if e.message().contains("non-fast-forward") || e.message().contains("not present locally") => {
                return Ok(Pushed::Rejected(self.describe(&e)))
            }
            Err(e) => return Err(self.describe(&e)),
        }
        drop(opts);
        match rejected.take() {
            Some(why) => {
                self.remove_stale_lock(&why);
                Ok(Pushed::Rejected(why))
            }
            None => Ok(Pushed::Done),
        }
    }

    /// A push to a remote on a local path writes into the remote repository itself: a daemon
    /// killed during one leaves the ref's lock file there, and every later push of every node
    /// fails on it. A push holds that lock for milliseconds, so one older than
    /// [`STALE_LOCK`] is a dead pusher's: it is removed (with a warning), as a human would.
    fn remove_stale_lock(&self, why: &str) {
        let Some(rest) = why.split("failed to lock file '").nth(1) else { return };
        let Some(lock) = rest.split('\'').next().map(std::path::PathBuf::from) else { return };
        let root = std::path::PathBuf::from(self.url.strip_prefix("file://").unwrap_or(&self.url));
        if self.url.contains("://") && !self.url.starts_with("file://") || !lock.starts_with(&root) {
            return;
        }
        if lock.extension().is_none_or(|e| e != "lock") {
            return;
        }
        let old = std::fs::metadata(&lock)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_LOCK);
        if old && std::fs::remove_file(&lock).is_ok() {
            tracing::warn!(lock = %lock.display(), "removed a stale lock file a killed push left in the git remote");
        }
    }
}

/// How old a ref lock in a local-path remote must be to count as a dead pusher's.
const STALE_LOCK: std::time::Duration = std::time::Duration::from_secs(10);
