//! The appliers: one task per stream that puts its messages into the tree, in order.
//!
//! On every connection the supervisor makes sure the streams exist with the configured limits,
//! then runs one applier per stream. The first applier run of a mount first lines the tree up
//! with the saved state: files longer than the state says are cut back (an apply the crash
//! interrupted, redone by the replay), files that are shorter, or unknown to a state that has
//! them, are rebuilt from the stream. Then it reads the stream from the saved resume point
//! with an ordered consumer and applies every message through [`LogState::handle`].
//!
//! Once caught up, and every `nats.stream.check_interval_ms` (30 s) after, it compares each
//! file's first sequence with the stream's: files whose oldest messages the stream dropped
//! (retention, size limits) are rebuilt from the messages the stream still holds, so every
//! node's files stay the same. On the first catch-up of a mount, files the stream has no
//! message for are removed.
//!
//! A file an apply could not change (the state directory's disk is full) is *torn*; every
//! second the applier rebuilds torn files from the stream once the disk has room for them.
//!
//! The state is saved at most once a second while it changes, and at shutdown.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{push, DeliverPolicy, ReplayPolicy};
use async_nats::jetstream::stream::{Config, DiscardPolicy, Stream};
use futures::StreamExt;

use super::key::{self, Decoded};
use super::log::{self, Action, FileState, Gathered, LogState, Msg, Op, Part};
use super::{Inner, Log, APPEND_HEADER, NODE_HEADER, OP_HEADER, PART_HEADER};
use crate::tier::{jetstream, RemoteChange};

/// Appended bytes are applied to the tree in chunks of at most this many.
const APPLY_CHUNK: usize = 1 << 20;
/// Free space a torn file's repair leaves besides the file itself.
const REPAIR_MARGIN: u64 = 64 << 10;

/// Runs for the life of the mount.
pub(super) async fn supervise(inner: Arc<Inner>) {
    let roots = inner.logs.iter().map(|l| l.root.clone()).collect();
    jetstream::create_roots(inner.sink().cloned(), roots).await;
    let mut first = true;
    jetstream::on_each_connection(&inner.nats, &inner.tasks, &inner.synced, |generation, state| {
        let inner = inner.clone();
        let reconcile = std::mem::take(&mut first);
        async move {
            let Some(streams) = jetstream::prepared("NATS streams are", generation, &state, || prepare(&inner)).await else {
                return;
            };
            let runs = streams
                .into_iter()
                .enumerate()
                .map(|(i, stream)| run_log(inner.clone(), i, stream, reconcile));
            futures::future::join_all(runs).await;
        }
    })
    .await;
}

/// Makes sure every stream exists with the configured limits.
async fn prepare(inner: &Arc<Inner>) -> anyhow::Result<Vec<Stream>> {
    inner.nats.check_server().await?;
    let mut streams = Vec::new();
    for log in &inner.logs {
        let config = Config {
            name: log.name.clone(),
            description: Some(format!("syncfs: appends to paths matching {}", log.policy.pattern)),
            subjects: vec![format!("{}>", log.prefix)],
            max_age: log.policy.max_age.unwrap_or_default(),
            max_bytes: inner.settings.max_bytes.unwrap_or(-1),
            max_messages: inner.settings.max_msgs.unwrap_or(-1),
            discard: DiscardPolicy::Old,
            num_replicas: inner.settings.replicas.max(1),
            storage: async_nats::jetstream::stream::StorageType::File,
            allow_rollup: true,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        let stream = match inner.nats.js.get_stream(&log.name).await {
            Ok(mut stream) => {
                let current = stream.info().await?.config.clone();
                let differs = current.max_age != config.max_age
                    || current.max_bytes != config.max_bytes
                    || current.max_messages != config.max_messages
                    || !current.allow_rollup;
                if differs {
                    tracing::info!(stream = %log.name, "updating the stream's limits");
                    inner.nats.js.update_stream(&config).await?;
                }
                stream
            }
            Err(_) => match inner.nats.js.create_stream(config).await {
                Ok(stream) => stream,
                // Another node created it first.
                Err(create) => inner
                    .nats
                    .js
                    .get_stream(&log.name)
                    .await
                    .map_err(|_| anyhow::anyhow!("cannot create the stream {}: {create}", log.name))?,
            },
        };
        streams.push(stream);
    }
    Ok(streams)
}

/// Saves a log's state if it changed.
pub(super) fn save(log: &Log) {
    let saved = {
        let mut state = log.state.lock();
        if !state.dirty {
            return;
        }
        state.dirty = false;
        state.saved()
    };
    if let Err(e) = log::store(&log.state_file, &saved) {
        tracing::warn!(file = %log.state_file.display(), error = %e, "cannot save the stream state");
        log.state.lock().dirty = true;
    }
}

/// Applies one action of `log` to the tree. A file the action could not change (a full
/// disk) is *torn*: it no longer matches the state, and is rebuilt from the stream once
/// there is room again ([`repair`]). Returns whether the action applied.
pub(super) fn apply(inner: &Inner, log: &Log, action: Action) -> bool {
    let Some(sink) = inner.sink() else { return true };
    let (path, result) = match action {
        Action::Truncate(path) => {
            let r = sink.apply(&path, RemoteChange::Append { at: 0, bytes: Vec::new() }, None);
            (path, r)
        }
        Action::Delete(path) => {
            let r = sink.apply(&path, RemoteChange::Delete, None);
            (path, r)
        }
        Action::Append { path, at, data } => {
            let r = apply_append(sink.as_ref(), &path, at, &data);
            (path, r)
        }
    };
    match result {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot apply an append to the tree; the file is rebuilt from the stream when there is room");
            log.torn.lock().insert(path);
            false
        }
    }
}

/// Rebuilds the torn files of `log` from the stream, when the disk has room for them again.
async fn repair(inner: &Inner, log: &Log, stream: &Stream) -> anyhow::Result<()> {
    let torn: Vec<PathBuf> = log.torn.lock().iter().cloned().collect();
    if torn.is_empty() {
        return Ok(());
    }
    let _order = log.apply_lock.lock().await;
    for path in torn {
        let need = log.state.lock().files.get(&path).map_or(0, |f| f.len) + REPAIR_MARGIN;
        if crate::tier::space::short_of(&log.state_file.parent().unwrap_or(Path::new("/")), need) {
            continue;
        }
        log.torn.lock().remove(&path);
        tracing::info!(path = %path.display(), "repairing a torn file");
        rebuild(inner, log, stream, &path).await?;
    }
    Ok(())
}

fn apply_append(sink: &dyn crate::tier::RemoteSink, path: &Path, at: u64, data: &Gathered) -> Result<(), String> {
    let mut offset = 0;
    loop {
        let bytes = data.chunk(offset, APPLY_CHUNK).map_err(|e| e.to_string())?;
        let n = bytes.len() as u64;
        sink.apply(path, RemoteChange::Append { at: at + offset, bytes }, None)?;
        offset += n;
        if offset >= data.len() {
            return Ok(());
        }
    }
}

/// Decodes a message of a log's stream; `None` for messages that are not a file of this log.
fn decode(inner: &Inner, log: &Log, message: &async_nats::Message, seq: u64) -> Option<Msg> {
    let k = message.subject.as_str().strip_prefix(&log.prefix)?;
    let Some(Decoded::File(path)) = key::decode(k) else { return None };
    if inner.policies.resolve(&path).pattern != log.policy.pattern {
        return None;
    }
    let headers = message.headers.as_ref();
    let header = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str().to_string());
    let op = match header(OP_HEADER).as_deref() {
        Some("truncate") => Op::Truncate,
        Some("delete") => Op::Delete,
        _ => {
            let part = header(PART_HEADER).and_then(|p| {
                let (k, n) = p.split_once('/')?;
                Some(Part {
                    id: header(APPEND_HEADER)?,
                    k: k.parse().ok()?,
                    n: n.parse().ok()?,
                })
            });
            Op::Append(part)
        }
    };
    let msg_id = header(async_nats::header::NATS_MESSAGE_ID.as_ref());
    // Message ids are `<writer prefix><counter>[.<part>]`; the prefix ends with `-`.
    let writer = msg_id.and_then(|id| id.rfind('-').map(|i| id[..=i].to_string()));
    Some(Msg {
        seq,
        path,
        op,
        node: header(NODE_HEADER),
        payload: message.payload.clone(),
        writer,
    })
}

/// Lines the tree up with the saved state before the first replay (see the module docs).
/// Returns the files to rebuild from the stream.
fn reconcile(inner: &Inner, log: &Log) -> Vec<PathBuf> {
    let Some(sink) = inner.sink() else { return Vec::new() };
    let files = log.state.lock().files.clone();
    let mut rebuild = Vec::new();
    for (path, file) in &files {
        match sink.size(path) {
            Some(len) if len == file.len => {}
            Some(len) if len > file.len => {
                tracing::info!(path = %path.display(), len, saved = file.len, "cutting a file back to its saved length");
                if let Err(e) = sink.apply(path, RemoteChange::Append { at: file.len, bytes: Vec::new() }, None) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot cut back");
                }
            }
            _ => rebuild.push(path.clone()),
        }
    }
    for path in sink.files(&log.root) {
        if files.contains_key(&path) || inner.policies.resolve(&path).pattern != log.policy.pattern {
            continue;
        }
        // No message up to the resume point made it: the replay brings what later ones hold.
        if let Err(e) = sink.apply(&path, RemoteChange::Append { at: 0, bytes: Vec::new() }, None) {
            tracing::warn!(path = %path.display(), error = %e, "cannot empty a file for its replay");
        }
    }
    rebuild
}

/// Rebuilds one file from what the stream holds for it, up to the sequence the applier
/// handled (later messages reach it through the applier).
async fn rebuild(inner: &Inner, log: &Log, stream: &Stream, path: &Path) -> anyhow::Result<()> {
    let upto = log.state.lock().applied;
    let key = key::encode(path).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let subject = format!("{}{key}", log.prefix);
    let consumer = stream
        .create_consumer(push::OrderedConfig {
            deliver_subject: inner.nats.client.new_inbox(),
            filter_subject: subject,
            replay_policy: ReplayPolicy::Instant,
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let spill = log.state.lock().spill_dir.clone();
    let mut scratch = LogState::restore(Default::default(), spill);
    let mut actions = Vec::new();
    if consumer.cached_info().num_pending > 0 {
        let mut messages = consumer.messages().await?;
        while let Some(message) = tokio::time::timeout(inner.nats.timeout, messages.next()).await? {
            let message = message?;
            let (seq, pending) = {
                let info = message.info().map_err(|e| anyhow::anyhow!("{e}"))?;
                (info.stream_sequence, info.pending)
            };
            if seq > upto {
                break;
            }
            if let Some(msg) = decode(inner, log, &message.message, seq) {
                if let Some(action) = scratch.handle(msg)? {
                    actions.push(action);
                }
            }
            if pending == 0 {
                break;
            }
        }
    }
    let rebuilt = scratch.files.get(path).cloned();
    tracing::info!(path = %path.display(), messages = actions.len(), "rebuilding a file from its stream");
    // In place: the first action starts the file over (an append at 0 cuts it), so programs
    // that have it open (a writer, `tail -f`) keep it. Only a file left without messages goes.
    if actions.is_empty() {
        if let Some(sink) = inner.sink() {
            let _ = sink.apply(path, RemoteChange::Delete, None);
        }
    }
    for action in actions {
        apply(inner, log, action);
    }
    log.state.lock().set_file(path, rebuilt);
    Ok(())
}

/// Rebuilds the files whose oldest message the stream no longer has.
async fn trim(inner: &Inner, log: &Log, stream: &mut Stream) -> anyhow::Result<()> {
    let first = stream.info().await?.state.first_sequence;
    let _order = log.apply_lock.lock().await;
    let stale: Vec<PathBuf> = log
        .state
        .lock()
        .files
        .iter()
        .filter(|(_, f): &(&PathBuf, &FileState)| f.first < first)
        .map(|(p, _)| p.clone())
        .collect();
    for path in stale {
        rebuild(inner, log, stream, &path).await?;
    }
    Ok(())
}

/// Removes files the stream has no message for (first catch-up of a mount only: later, a
/// program may have created a file whose first append is on its way).
fn sweep(inner: &Inner, log: &Log) {
    let Some(sink) = inner.sink() else { return };
    for path in sink.files(&log.root) {
        if inner.policies.resolve(&path).pattern != log.policy.pattern || log.state.lock().files.contains_key(&path) {
            continue;
        }
        tracing::debug!(path = %path.display(), "no message in the stream; removing");
        let _ = sink.apply(&path, RemoteChange::Delete, None);
    }
}

async fn run_log(inner: Arc<Inner>, i: usize, mut stream: Stream, first: bool) {
    let log = &inner.logs[i];
    let mut first = first;
    loop {
        match apply_log(&inner, i, &mut stream, first).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(stream = %log.name, error = %format!("{e:#}"), "applier failed; restarting");
                save(log);
                first = false;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn apply_log(inner: &Arc<Inner>, i: usize, stream: &mut Stream, first: bool) -> anyhow::Result<()> {
    let log = &inner.logs[i];
    let info = stream.info().await?.state.clone();
    if log.state.lock().applied > info.last_sequence {
        // The stream is newer than the state (it was deleted and made again): start over.
        tracing::warn!(stream = %log.name, "the stream was reset; rebuilding its files");
        let files: Vec<PathBuf> = log.state.lock().files.keys().cloned().collect();
        let mut state = log.state.lock();
        let spill = state.spill_dir.clone();
        *state = LogState::restore(Default::default(), spill);
        drop(state);
        if let Some(sink) = inner.sink() {
            for path in files {
                let _ = sink.apply(&path, RemoteChange::Delete, None);
            }
        }
    }
    if first {
        let _order = log.apply_lock.lock().await;
        for path in reconcile(inner, log) {
            rebuild(inner, log, stream, &path).await?;
        }
    }
    let resume = log.state.lock().saved().resume;
    let consumer = stream
        .create_consumer(push::OrderedConfig {
            deliver_subject: inner.nats.client.new_inbox(),
            description: Some(format!("syncfs applier of {}", log.name)),
            filter_subject: format!("{}>", log.prefix),
            replay_policy: ReplayPolicy::Instant,
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: resume + 1,
            },
            ..Default::default()
        })
        .await?;
    let mut synced = consumer.cached_info().num_pending == 0;
    let mut messages = consumer.messages().await?;
    let mut last_save = Instant::now();
    let mut last_trim = Instant::now();
    let mut swept = !first;
    if synced {
        caught_up(inner, i, stream, &mut swept).await?;
    }
    let mut tick = tokio::time::interval(inner.settings.check_interval.min(Duration::from_secs(1)));
    loop {
        let next = tokio::select! {
            next = messages.next() => next,
            _ = tick.tick() => {
                if last_save.elapsed() >= Duration::from_secs(1) {
                    save(log);
                    last_save = Instant::now();
                }
                if synced {
                    repair(inner, log, stream).await?;
                }
                if synced && last_trim.elapsed() >= inner.settings.check_interval {
                    trim(inner, log, stream).await?;
                    last_trim = Instant::now();
                }
                continue;
            }
        };
        let Some(message) = next else {
            anyhow::bail!("the applier's consumer ended");
        };
        let message = message?;
        let (seq, pending) = {
            let info = message.info().map_err(|e| anyhow::anyhow!("{e}"))?;
            (info.stream_sequence, info.pending)
        };
        let order = log.apply_lock.lock().await;
        let action = match decode(inner, log, &message.message, seq) {
            Some(msg) => log.state.lock().handle(msg)?,
            None => {
                let mut state = log.state.lock();
                state.applied = state.applied.max(seq);
                None
            }
        };
        if let Some(action) = action {
            apply(inner, log, action);
        }
        drop(order);
        log.applied.send_modify(|a| *a = (*a).max(seq));
        if !synced && pending == 0 {
            synced = true;
            caught_up(inner, i, stream, &mut swept).await?;
        }
    }
}

/// The applier caught up: rebuild trimmed files, sweep (once), and say so.
async fn caught_up(inner: &Arc<Inner>, i: usize, stream: &mut Stream, swept: &mut bool) -> anyhow::Result<()> {
    let log = &inner.logs[i];
    trim(inner, log, stream).await?;
    if !*swept {
        sweep(inner, log);
        *swept = true;
    }
    let applied = log.state.lock().applied;
    log.applied.send_replace(applied);
    save(log);
    inner.synced.send_modify(|s| s[i] = true);
    tracing::info!(stream = %log.name, files = log.state.lock().files.len(), "the stream's files are up to date");
    Ok(())
}
