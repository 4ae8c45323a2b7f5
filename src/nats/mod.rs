//! The NATS connection the NATS tiers share: settings and credentials, the embedded default
//! server, the server version check, and connection state.
//!
//! syncfs needs nats-server 2.10 or newer: async-nats cannot create KV buckets on 2.9, and
//! 2.9's compare-and-swap is unsafe on replicated buckets (fixed in 2.9.21). A server that is
//! too old is refused with a message that says so, at connect time.
//!
//! Credentials come from the config file or the environment (`SYNCFS_NATS_USER`,
//! `SYNCFS_NATS_PASSWORD`, `SYNCFS_NATS_TOKEN`, `SYNCFS_NATS_CREDS`) or the URL itself; they are
//! [`Secret`]s, which never print, and URLs are [`redact`]ed before they reach a log or
//! `syncfs status`.

pub mod embedded;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use async_nats::jetstream;
use tokio::sync::watch;

/// The oldest nats-server syncfs works with.
pub const MIN_VERSION: (u64, u64, u64) = (2, 10, 0);

/// Parses `2.10.27` (and `2.11.0-beta.1`) into numbers.
pub fn parse_version(s: &str) -> Option<(u64, u64, u64)> {
    let core = s.trim().trim_start_matches('v').split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u64>());
    Some((parts.next()?.ok()?, parts.next()?.ok()?, parts.next().unwrap_or(Ok(0)).ok()?))
}

/// A credential: kept in memory, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// How to reach and use NATS.
#[derive(Debug, Clone, PartialEq)]
pub struct NatsSettings {
    /// Server URLs; empty means the embedded default.
    pub urls: Vec<String>,
    /// Where the embedded default listens (`--listen`, `nats.listen`): `HOST` or `HOST:PORT`;
    /// none: 127.0.0.1 only.
    pub listen: Option<String>,
    /// User name.
    pub user: Option<String>,
    /// Password.
    pub password: Option<Secret>,
    /// Token.
    pub token: Option<Secret>,
    /// A `.creds` file (JWT and NKey seed).
    pub credentials: Option<PathBuf>,
    /// CA certificate (PEM) to verify the servers.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM).
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Refuse plain-text connections.
    pub tls_required: bool,
    /// Replicas of the buckets syncfs creates.
    pub replicas: usize,
    /// History of the buckets syncfs creates (values kept per key).
    pub history: i64,
    /// How long a publish may take, retries included, before its outcome counts as unknown:
    /// strongly consistent operations fail within it.
    pub timeout: Duration,
    /// How often the client pings the server: after three unanswered pings the connection
    /// counts as dead (a half-open link or a stopped server) and is replaced.
    pub ping_interval: Duration,
}

impl Default for NatsSettings {
    fn default() -> Self {
        NatsSettings {
            urls: Vec::new(),
            listen: None,
            user: None,
            password: None,
            token: None,
            credentials: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_required: false,
            replicas: 1,
            history: 1,
            timeout: Duration::from_secs(2),
            ping_interval: Duration::from_secs(1),
        }
    }
}

impl NatsSettings {
    /// Fills credentials the config did not give from `SYNCFS_NATS_*`.
    pub fn with_env(mut self) -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if self.user.is_none() {
            self.user = var("SYNCFS_NATS_USER");
        }
        if self.password.is_none() {
            self.password = var("SYNCFS_NATS_PASSWORD").map(Secret);
        }
        if self.token.is_none() {
            self.token = var("SYNCFS_NATS_TOKEN").map(Secret);
        }
        if self.credentials.is_none() {
            self.credentials = var("SYNCFS_NATS_CREDS").map(PathBuf::from);
        }
        self
    }
}

/// A URL without user, password or token: safe for logs and status.
pub fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let host = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
            format!("{scheme}://{host}")
        }
        None => url.rsplit_once('@').map(|(_, h)| h).unwrap_or(url).to_string(),
    }
}

/// Why a JetStream publish failed, after retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishFailure {
    /// The subject's last sequence was not the expected one (compare-and-swap lost).
    WrongLastSequence,
    /// The message is larger than the server's `max_payload`.
    TooBig,
    /// No stream takes the subject (JetStream is starting, stopping or has no leader).
    NoStream,
    /// Nothing was published: the server is unreachable or refused the request.
    Unavailable(String),
    /// The message went out (or waits in the client's buffer for the next connection) and no
    /// acknowledgement came within the timeout: it may land, now or later. A retry with the
    /// same message id is safe while JetStream's duplicate window lasts.
    Unknown(String),
}

impl fmt::Display for PublishFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublishFailure::WrongLastSequence => f.write_str("wrong last sequence"),
            PublishFailure::TooBig => f.write_str("larger than the server's max_payload"),
            PublishFailure::NoStream => f.write_str("no stream takes the subject"),
            PublishFailure::Unavailable(reason) => f.write_str(reason),
            PublishFailure::Unknown(reason) => write!(f, "outcome unknown: {reason}"),
        }
    }
}

/// The state of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Not connected yet.
    Connecting,
    /// Connected.
    Connected,
    /// Lost; reconnecting.
    Disconnected,
    /// The server refused the credentials.
    Refused,
}

impl ConnState {
    /// The word `syncfs status` shows.
    pub fn name(self) -> &'static str {
        match self {
            ConnState::Connecting => "connecting",
            ConnState::Connected => "connected",
            ConnState::Disconnected => "disconnected",
            ConnState::Refused => "credentials refused",
        }
    }
}

/// A connection to NATS with JetStream.
#[derive(Debug)]
pub struct Nats {
    /// The client.
    pub client: async_nats::Client,
    /// JetStream on it.
    pub js: jetstream::Context,
    /// The first server URL, redacted.
    pub url: String,
    /// Whether syncfs started the server.
    pub embedded: bool,
    /// How long a request may take.
    pub timeout: Duration,
    /// Bucket settings.
    pub replicas: usize,
    /// Bucket settings.
    pub history: i64,
    state: watch::Receiver<(ConnState, u64)>,
}

impl Nats {
    /// Connects. Waits up to `wait` for the first connection: if the servers answer, their
    /// version and JetStream are checked (errors stop the mount); if not, syncfs starts
    /// offline and keeps trying in the background.
    pub async fn connect(
        settings: &NatsSettings,
        urls: &[String],
        embedded: bool,
        node: &str,
        wait: Duration,
    ) -> anyhow::Result<Arc<Nats>> {
        let (tx, rx) = watch::channel((ConnState::Connecting, 0u64));
        let tx = Arc::new(tx);
        let events = tx.clone();
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("syncfs-{node}"))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .ping_interval(settings.ping_interval)
            .request_timeout(Some(settings.timeout))
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((50u64 << attempts.min(6)).min(2000))
            })
            .event_callback(move |event| {
                let events = events.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            events.send_modify(|s| {
                                s.0 = ConnState::Connected;
                                s.1 += 1;
                            });
                        }
                        async_nats::Event::Disconnected => {
                            events.send_modify(|s| s.0 = ConnState::Disconnected);
                        }
                        async_nats::Event::ServerError(async_nats::ServerError::AuthorizationViolation) => {
                            events.send_modify(|s| s.0 = ConnState::Refused);
                        }
                        // How a refused first connection is reported while retrying it.
                        async_nats::Event::ClientError(async_nats::ClientError::Other(reason))
                            if reason.contains("authoriz") || reason.contains("authenticat") =>
                        {
                            events.send_modify(|s| s.0 = ConnState::Refused);
                        }
                        other => tracing::debug!(event = %other, "nats event"),
                    }
                }
            });
        let addrs = urls
            .iter()
            .map(|u| u.parse::<async_nats::ServerAddr>().map_err(|e| anyhow!("invalid NATS URL {}: {e}", redact(u))))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // async-nats reads no credentials from URLs: take `user:password@` (or a lone
        // `token@`) from the first URL that has them, unless the config or environment did.
        let mut user = settings.user.clone().zip(settings.password.clone());
        let mut token = settings.token.clone();
        if user.is_none() && token.is_none() {
            if let Some(addr) = addrs.iter().find(|a| a.username().is_some()) {
                let name = addr.username().unwrap_or_default().to_string();
                match addr.password() {
                    Some(pw) => user = Some((name, Secret(pw.to_string()))),
                    None => token = Some(Secret(name)),
                }
            }
        }
        if let Some((user, password)) = user {
            options = options.user_and_password(user, password.0);
        }
        if let Some(token) = token {
            options = options.token(token.0);
        }
        if let Some(creds) = &settings.credentials {
            options = options
                .credentials_file(creds)
                .await
                .with_context(|| format!("cannot read the NATS credentials file {}", creds.display()))?;
        }
        if let Some(ca) = &settings.tls_ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&settings.tls_cert, &settings.tls_key) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        if settings.tls_required {
            options = options.require_tls(true);
        }
        let shown = urls.first().map(|u| redact(u)).unwrap_or_default();
        let client = options
            .connect(addrs)
            .await
            .with_context(|| format!("cannot connect to NATS at {shown}"))?;
        let mut jetstream = jetstream::new(client.clone());
        jetstream.set_timeout(settings.timeout);
        let nats = Arc::new(Nats {
            client,
            js: jetstream,
            url: shown.clone(),
            embedded,
            timeout: settings.timeout,
            replicas: settings.replicas,
            history: settings.history,
            state: rx,
        });
        let mut state = nats.state.clone();
        let settled = tokio::time::timeout(
            wait,
            state.wait_for(|s| matches!(s.0, ConnState::Connected | ConnState::Refused)),
        )
        .await
        .map(|s| s.map(|s| s.0));
        if matches!(settled, Ok(Ok(ConnState::Refused))) {
            nats.client.clone().drain().await.ok();
            bail!(
                "NATS at {shown} refused the credentials (authorization violation); check \
                 nats.user/password, nats.token or nats.credentials, or SYNCFS_NATS_*"
            );
        }
        if matches!(settled, Ok(Ok(ConnState::Connected))) {
            nats.check_server().await?;
            tracing::info!(url = %shown, version = %nats.client.server_info().version, "connected to NATS");
        } else {
            tracing::warn!(url = %shown, "NATS is unreachable; starting offline (reads serve the last known state, lww writes are queued)");
        }
        Ok(nats)
    }

    /// Refuses servers that are too old or lack JetStream.
    pub async fn check_server(&self) -> anyhow::Result<()> {
        let info = self.client.server_info();
        match parse_version(&info.version) {
            Some(v) if v >= MIN_VERSION => {}
            _ => bail!(
                "nats-server {} at {} is too old: syncfs needs {}.{} or newer (KV buckets and \
                 compare-and-swap on replicated buckets)",
                info.version,
                self.url,
                MIN_VERSION.0,
                MIN_VERSION.1
            ),
        }
        self.js
            .query_account()
            .await
            .map_err(|e| anyhow!("JetStream is not available on {} ({e}); start nats-server with -js", self.url))?;
        Ok(())
    }

    /// The connection's state now.
    pub fn state(&self) -> ConnState {
        self.state.borrow().0
    }

    /// Whether the connection is up now (checked before strongly consistent operations, which
    /// fail fast with EAGAIN rather than wait).
    pub fn is_connected(&self) -> bool {
        self.state() == ConnState::Connected
            && self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// A receiver of (state, number of connections so far): each new connection means watches
    /// must be rebuilt.
    pub fn watch_state(&self) -> watch::Receiver<(ConnState, u64)> {
        self.state.clone()
    }

    /// Publishes one message to JetStream and waits for its acknowledgement; returns the
    /// stream sequence it got. A lost acknowledgement is retried with the same `msg_id`, which
    /// JetStream de-duplicates (for a duplicate, the ack names the original's sequence), while
    /// the timeout lasts: the whole call takes at most `timeout`, so a strongly consistent
    /// operation fails within it.
    pub async fn publish(
        &self,
        subject: String,
        payload: bytes::Bytes,
        headers: async_nats::HeaderMap,
        msg_id: &str,
        expected_last_subject_sequence: Option<u64>,
    ) -> Result<u64, PublishFailure> {
        use async_nats::jetstream::context::PublishErrorKind as Kind;
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut sent = false;
        loop {
            let mut message = jetstream::message::PublishMessage::build()
                .payload(payload.clone())
                .headers(headers.clone())
                .message_id(msg_id);
            if let Some(seq) = expected_last_subject_sequence {
                message = message.expected_last_subject_sequence(seq);
            }
            let unknown = |why: &str| PublishFailure::Unknown(format!("{why} within {:?}", self.timeout));
            let ack = match tokio::time::timeout_at(deadline, self.js.send_publish(subject.clone(), message)).await {
                // The client may have taken it into its buffer: it can still go out.
                Err(_) => return Err(unknown("not sent")),
                Ok(Err(e)) if !sent => return Err(PublishFailure::Unavailable(e.to_string())),
                Ok(Err(_)) => return Err(unknown("not acknowledged")),
                Ok(Ok(ack)) => ack,
            };
            sent = true;
            let result = match tokio::time::timeout_at(deadline, ack).await {
                Err(_) => return Err(unknown("not acknowledged")),
                Ok(result) => result,
            };
            match result {
                // A retry the server de-duplicated without knowing where the first attempt went
                // (a leader change drained it: nats-server #6415) is no confirmation: it may
                // never be stored. Outcome unknown, settled by the message id like a lost ack.
                Ok(ack) if ack.sequence == 0 => return Err(unknown("acknowledged as a duplicate of no stored message")),
                Ok(ack) => return Ok(ack.sequence),
                Err(e) => match e.kind() {
                    Kind::WrongLastSequence => return Err(PublishFailure::WrongLastSequence),
                    Kind::MaxPayloadExceeded => return Err(PublishFailure::TooBig),
                    Kind::StreamNotFound => return Err(PublishFailure::NoStream),
                    Kind::TimedOut | Kind::BrokenPipe | Kind::MaxAckPending => {
                        if tokio::time::Instant::now() >= deadline || !self.is_connected() {
                            return Err(unknown("not acknowledged"));
                        }
                        tracing::debug!(%subject, "publish not acknowledged; retrying with the same message id");
                    }
                    _ => return Err(unknown(&e.to_string())),
                },
            }
        }
    }

    /// The largest message the server accepts.
    pub fn max_payload(&self) -> usize {
        match self.client.server_info().max_payload {
            0 => 1 << 20,
            n => n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare() {
        assert_eq!(parse_version("2.10.27"), Some((2, 10, 27)));
        assert_eq!(parse_version("v2.11.0-beta.1"), Some((2, 11, 0)));
        assert!(parse_version("2.9.10").unwrap() < MIN_VERSION);
        assert!(parse_version("2.10.0").unwrap() >= MIN_VERSION);
        assert_eq!(parse_version("garbage"), None);
    }

    #[test]
    fn urls_lose_their_credentials() {
        assert_eq!(redact("nats://alice:s3cret@host:4222"), "nats://host:4222");
        assert_eq!(redact("tls://token@host:4222"), "tls://host:4222");
        assert_eq!(redact("nats://host:4222"), "nats://host:4222");
        assert_eq!(redact("host:4222"), "host:4222");
        assert_eq!(format!("{:?}", Secret("pw".into())), "Secret(***)");
    }
}
