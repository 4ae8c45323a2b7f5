//! What the three NATS tiers (KV, streams, blobs) share: message ids that let a watch tell
//! this process's own changes, the background tasks of a tier and their restart on every
//! NATS connection, bucket creation, and the watch of a KV bucket's last values.

use std::collections::HashSet;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::consumer::{push, DeliverPolicy, ReplayPolicy};
use async_nats::jetstream::kv;
use async_nats::jetstream::stream::Stream;
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::kv::key;
use super::{RemoteChange, RemoteSink, TierError};
use crate::nats::{ConnState, Nats};

/// The message ids one process publishes: `<node>-<boot nonce>-<pid>-<n>`. The prefix is
/// unique to the process, so its watches recognise its own changes even when another mount
/// uses the same node name.
#[derive(Debug)]
pub struct MsgIds {
    prefix: String,
    next: AtomicU64,
}

impl MsgIds {
    /// Ids for this process on `node`.
    pub fn new(node: &str) -> MsgIds {
        let nonce = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        MsgIds {
            prefix: format!("{node}-{nonce:x}-{}-", std::process::id()),
            next: AtomicU64::new(1),
        }
    }

    /// A new id.
    pub fn next(&self) -> String {
        self.with(self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// The id made of `n` (for ids the caller numbers itself, so that retries keep them).
    pub fn with(&self, n: u64) -> String {
        format!("{}{n}", self.prefix)
    }

    /// The prefix of every id of this process.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether this process published `message`.
    pub fn is_own(&self, message: &async_nats::Message) -> bool {
        message
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .is_some_and(|id| id.as_str().starts_with(&self.prefix))
    }
}

/// A tier's background work: tasks for the life of the mount, and the work of the current
/// NATS connection (replaced on every reconnect).
#[derive(Debug, Default)]
pub struct Tasks {
    life: Mutex<Vec<JoinHandle<()>>>,
    connection: Mutex<Option<JoinHandle<()>>>,
}

impl Tasks {
    /// Keeps a task for the life of the mount.
    pub fn keep(&self, task: JoinHandle<()>) {
        self.life.lock().push(task);
    }

    /// Stops everything and waits until it has stopped.
    pub async fn stop(&self) {
        let tasks: Vec<_> = self.life.lock().drain(..).chain(self.connection.lock().take()).collect();
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// Runs `connected` on every new NATS connection (the first and each reconnect), after
/// clearing `synced`; the previous connection's work is aborted. Returns when the
/// connection's state channel closes.
pub async fn on_each_connection<F, Fut>(nats: &Nats, tasks: &Tasks, synced: &watch::Sender<Vec<bool>>, mut connected: F)
where
    F: FnMut(u64, watch::Receiver<(ConnState, u64)>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut state = nats.watch_state();
    let mut handled = 0u64;
    loop {
        let generation = match state.wait_for(|s| s.0 == ConnState::Connected && s.1 > handled).await {
            Ok(s) => s.1,
            Err(_) => return,
        };
        handled = generation;
        synced.send_modify(|s| s.iter_mut().for_each(|b| *b = false));
        let task = tokio::spawn(connected(generation, state.clone()));
        if let Some(previous) = tasks.connection.lock().replace(task) {
            previous.abort();
        }
    }
}

/// Retries `prepare` every 2 s while connection `generation` lasts; `None` once it is gone.
pub async fn prepared<T, Fut>(
    what: &str,
    generation: u64,
    state: &watch::Receiver<(ConnState, u64)>,
    mut prepare: impl FnMut() -> Fut,
) -> Option<T>
where
    Fut: Future<Output = anyhow::Result<T>>,
{
    loop {
        match prepare().await {
            Ok(t) => return Some(t),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "{what} not usable yet; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
                if state.borrow().1 != generation {
                    return None;
                }
            }
        }
    }
}

/// Waits until every flag of `synced` is set, or `timeout` passes; returns whether they were.
pub async fn wait_synced(synced: &watch::Sender<Vec<bool>>, timeout: Duration) -> bool {
    let mut rx = synced.subscribe();
    let done = tokio::time::timeout(timeout, rx.wait_for(|s| s.iter().all(|b| *b))).await;
    done.is_ok()
}

/// Creates the literal directory prefixes of a tier's policies in the tree, so that
/// `fast/claims/` exists before the first claim.
pub async fn create_roots(sink: Option<Arc<dyn RemoteSink>>, roots: Vec<PathBuf>) {
    let Some(sink) = sink else { return };
    let _ = tokio::task::spawn_blocking(move || {
        for root in roots.into_iter().filter(|r| !r.as_os_str().is_empty()) {
            if let Err(e) = sink.apply(&root, RemoteChange::Dir { created: None }, None) {
                tracing::warn!(root = %root.display(), error = %e, "cannot create a policy's directory");
            }
        }
    })
    .await;
}

/// Opens a KV bucket, creating it with `config` if it does not exist (another node may
/// create it first).
pub async fn kv_bucket(nats: &Nats, config: kv::Config) -> anyhow::Result<kv::Store> {
    if let Ok(store) = nats.js.get_key_value(&config.bucket).await {
        return Ok(store);
    }
    let name = config.bucket.clone();
    match nats.js.create_key_value(config).await {
        Ok(store) => Ok(store),
        Err(create) => nats
            .js
            .get_key_value(&name)
            .await
            .map_err(|_| anyhow::anyhow!("cannot create the KV bucket {name}: {create}")),
    }
}

/// The key of a file at `path`, or the errno a program sees for a path that cannot be one.
pub fn key_of(path: &std::path::Path) -> Result<String, TierError> {
    key::encode(path).map_err(|e| match e {
        key::KeyError::TooLong => TierError::Io(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG)),
        key::KeyError::NotAPath => TierError::Io(std::io::Error::from_raw_os_error(libc::EINVAL)),
    })
}

/// What a failed publish of `subject` means to a program. A missing stream counts as
/// JetStream being unavailable: the tier made its stream when it connected, so it is starting,
/// stopping or without a leader (lww writes queue, strong operations get EAGAIN).
pub fn publish_error(tier: crate::policy::TierKind, subject: &str, e: crate::nats::PublishFailure) -> TierError {
    use crate::nats::PublishFailure as F;
    match e {
        F::TooBig => TierError::TooBig(format!("{subject}: larger than the server's max_payload")),
        F::NoStream => TierError::unavailable(tier, format!("JetStream has no stream for {subject} now (starting, stopping or without a leader)")),
        F::WrongLastSequence => TierError::Backend(format!("{subject}: unexpected sequence check")),
        F::Unavailable(reason) => TierError::unavailable(tier, reason),
        F::Unknown(reason) => TierError::Unknown { tier, reason },
    }
}

/// Runs blocking file work off the runtime's workers.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, TierError> + Send + 'static) -> Result<T, TierError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TierError::Backend(format!("blocking task: {e}")))?
}

/// What a watch of a bucket's last values does with what it hears.
pub trait LastValues {
    /// Takes one message (stream sequence `seq`, published at `created`); returns the path it
    /// concerns, if any.
    fn handle(&self, message: &async_nats::Message, seq: u64, created: SystemTime) -> Option<PathBuf>;

    /// The watch has delivered the last value of every key: `seen` are the paths it named.
    fn caught_up(&self, seen: &HashSet<PathBuf>);
}

/// Watches `stream` (a KV bucket's) under `filter`: the last value of every key, then every
/// change, with [`LastValues::caught_up`] once in between. Runs until the watch fails.
pub async fn watch_last_values(nats: &Nats, stream: &Stream, filter: String, description: String, handler: &impl LastValues) -> anyhow::Result<()> {
    let consumer = stream
        .create_consumer(push::OrderedConfig {
            deliver_subject: nats.client.new_inbox(),
            description: Some(description),
            filter_subject: filter,
            replay_policy: ReplayPolicy::Instant,
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await?;
    let mut synced = consumer.cached_info().num_pending == 0;
    let mut seen: HashSet<PathBuf> = HashSet::new();
    if synced {
        handler.caught_up(&seen);
    }
    let mut messages = consumer.messages().await?;
    loop {
        let next = if synced {
            messages.next().await
        } else {
            // Keys can vanish between the consumer's creation and their delivery, so the last
            // one may never say "nothing pending": a quiet second means caught up.
            match tokio::time::timeout(Duration::from_secs(1), messages.next()).await {
                Ok(next) => next,
                Err(_) => {
                    handler.caught_up(&seen);
                    synced = true;
                    continue;
                }
            }
        };
        let Some(message) = next else {
            anyhow::bail!("the watch ended");
        };
        let message = message?;
        let (seq, pending, created) = {
            let info = message.info().map_err(|e| anyhow::anyhow!("{e}"))?;
            (info.stream_sequence, info.pending, SystemTime::from(info.published))
        };
        let path = handler.handle(&message.message, seq, created);
        if !synced {
            if let Some(path) = path {
                seen.insert(path);
            }
            if pending == 0 {
                handler.caught_up(&seen);
                synced = true;
            }
        }
    }
}

/// Runs `run` again a second after each failure, until it returns `Ok`.
pub async fn restarting<Fut>(what: &str, mut run: impl FnMut() -> Fut)
where
    Fut: Future<Output = anyhow::Result<()>>,
{
    loop {
        match run().await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "{what} failed; restarting");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
