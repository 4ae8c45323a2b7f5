//! Prometheus text metrics on a loopback address (`metrics.listen`), made from the same
//! status document as `syncfs status --json`, so the two never disagree.
//!
//! A minimal HTTP/1.0 responder on the daemon's runtime: `GET /metrics` (any path) answers
//! the text exposition format; the connection closes after each answer. It binds only where
//! the config says (a loopback address unless the operator names another).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::status::Status;

/// Produces the status document (the daemon's status closure).
pub type StatusFn = Arc<dyn Fn() -> Vec<u8> + Send + Sync>;

/// Starts answering metrics on `addr`. Fails at once if the address cannot be bound.
pub fn start(runtime: &tokio::runtime::Handle, addr: SocketAddr, status: StatusFn) -> anyhow::Result<SocketAddr> {
    let std_listener = std::net::TcpListener::bind(addr).map_err(|e| anyhow::anyhow!("metrics.listen {addr}: {e}"))?;
    std_listener.set_nonblocking(true)?;
    let bound = std_listener.local_addr()?;
    let _guard = runtime.enter();
    let listener = tokio::net::TcpListener::from_std(std_listener)?;
    runtime.spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else { continue };
            let status = status.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = 0;
                // The request line and headers; the body (none for GET) is not read.
                while got < buf.len() && !buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                    match tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut buf[got..])).await {
                        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                        Ok(Ok(n)) => got += n,
                    }
                }
                let body = match serde_json::from_slice::<Status>(&status()) {
                    Ok(s) => render(&s),
                    Err(e) => format!("# the status could not be read: {e}\n"),
                };
                let head = format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(head.as_bytes()).await;
                let _ = conn.write_all(body.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    Ok(bound)
}

/// The metrics of a status document, in Prometheus's text format.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP syncfs_{name} {help}\n# TYPE syncfs_{name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "syncfs_{name}{labels} {value}");
        }
    };
    let node = escape(&s.node);
    let one = |v: f64| vec![(format!("{{node=\"{node}\"}}"), v)];
    let per_tier = |f: &dyn Fn(&crate::status::TierStatus) -> f64| -> Vec<(String, f64)> {
        s.tiers.iter().map(|(t, st)| (format!("{{node=\"{node}\",tier=\"{}\"}}", escape(t)), f(st))).collect()
    };
    metric("up", "gauge", "1 while the daemon answers.", &one(1.0));
    metric("healthy", "gauge", "1 when syncfs status would exit 0.", &one(if s.problems(std::time::SystemTime::now()).is_empty() { 1.0 } else { 0.0 }));
    metric("nats_connected", "gauge", "1 while the NATS connection is up.", &one(if s.nats.state == "connected" { 1.0 } else { 0.0 }));
    metric("commits_total", "counter", "Writes committed to their tier.", &per_tier(&|t| t.commits as f64));
    metric("refused_total", "counter", "Writes refused or failed at commit.", &per_tier(&|t| t.refused as f64));
    metric("commit_seconds_total", "counter", "Time spent committing writes (divide by commits for the mean latency).", &per_tier(&|t| t.commit_seconds));
    metric("committed_bytes_total", "counter", "Bytes committed.", &per_tier(&|t| t.bytes as f64));
    metric("fuse_read_requests_total", "counter", "Read requests the daemon served (passthrough reads never reach it).", &one(s.fuse.read_requests as f64));
    metric("fuse_write_requests_total", "counter", "Write requests the daemon served.", &one(s.fuse.write_requests as f64));
    metric("pending_writes", "gauge", "Writes accepted and queued for their tier.", &one(s.pending_writes as f64));
    metric("unknown_outcomes", "gauge", "Strong writes that timed out, not reconciled yet.", &one(s.nats.unknown_outcomes as f64));
    metric("git_unpushed_commits", "gauge", "Commits not on the git remote yet.", &one(s.git.unpushed as f64));
    metric("git_uncommitted_changes", "gauge", "Durable changes waiting for their commit.", &one(s.git.uncommitted as f64));
    metric("conflicts", "gauge", "Conflict files awaiting a human.", &one(s.conflicts.len() as f64));
    metric("lost_claims", "gauge", "Claims this mount held and lost.", &one(s.nats.lost_claims.len() as f64));
    metric("locks_held", "gauge", "Files this mount holds flock/fcntl locks on.", &one(s.locks_held.0 as f64));
    metric("open_files", "gauge", "Open file handles.", &one(s.open_files as f64));
    metric("inodes", "gauge", "Inodes the kernel references.", &one(s.inodes as f64));
    metric("blob_cache_bytes", "gauge", "Bytes in the blob cache.", &one(s.blobs.cached_bytes as f64));
    metric("events_total", "counter", "Events written to .syncfs/events.", &one(s.events.written as f64));
    metric("events_dropped_total", "counter", "Events left out of the feed.", &one(s.events.dropped as f64));
    metric("log_left_out_total", "counter", "Warning lines left out by the rate limit.", &one(s.log.left_out as f64));
    out
}

/// A label value as the text format wants it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
