//! A loopback TCP proxy the test controls, placed between a syncfs node and its nats-server
//! (`--nats nats://127.0.0.1:<proxy port>`), to cut the link in the ways networks do.
//!
//! **Modes** ([`Mode`]), switched at any time with [`Proxy::set`] (or the shorthands):
//!
//! - [`Mode::Pass`]: bytes flow both ways, as soon as they are read.
//! - [`Mode::Hard`]: a hard partition. Every connection is closed at once (both sockets shut
//!   down: each side reads end-of-file or a reset), and new connections are accepted and
//!   closed at once (connection refused, as far as a client can tell).
//! - [`Mode::HalfOpen`]: bytes stop in both directions, and sockets stay open: nothing reaches
//!   either side and nobody is told (a dead link, a stopped middlebox). New connections are
//!   accepted and connected upstream, and stall the same way. Bytes read meanwhile are held,
//!   and when the link heals ([`Proxy::heal`]) they are dropped and every connection that lived
//!   through the cut is reset, as TCP does once it gives up retransmitting.
//! - [`Mode::Hold`]: like half-open, but at heal every held byte is delivered, late, in order
//!   (then an end-of-file the peer sent meanwhile): the late retransmission of a link that
//!   comes back before TCP gave up. A message sent during the cut reaches the server after
//!   the sender timed out and maybe reconnected.
//!
//! One thread accepts; each connection has two pump threads (one per direction) that read
//! with a short timeout, so they see mode changes within [`TICK`]. Writes are never done
//! under a lock, so a peer that stops reading cannot block a mode change.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often a pump looks at the mode while its socket is quiet.
pub const TICK: Duration = Duration::from_millis(10);

/// What the link does with bytes and connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything.
    Pass = 0,
    /// Close every connection; refuse new ones.
    Hard = 1,
    /// Forward nothing, keep sockets open; at heal, drop what was held and reset.
    HalfOpen = 2,
    /// Forward nothing, keep sockets open; at heal, deliver what was held, late.
    Hold = 3,
}

impl Mode {
    fn from(v: u8) -> Mode {
        match v {
            1 => Mode::Hard,
            2 => Mode::HalfOpen,
            3 => Mode::Hold,
            _ => Mode::Pass,
        }
    }
}

/// One proxied connection: both sockets, to shut them down from outside the pumps.
struct Conn {
    down: TcpStream,
    up: TcpStream,
    closed: AtomicBool,
}

impl Conn {
    fn close(&self) {
        if !self.closed.swap(true, Ordering::SeqCst) {
            let _ = self.down.shutdown(Shutdown::Both);
            let _ = self.up.shutdown(Shutdown::Both);
        }
    }
}

struct Shared {
    mode: AtomicU8,
    /// Bumped at every heal from half-open: pumps holding bytes from before it drop them.
    resets: AtomicU64,
    conns: Mutex<Vec<Arc<Conn>>>,
    /// Bytes held now, both directions, every connection.
    held: AtomicU64,
    /// Bytes delivered late (after a hold) so far.
    released: AtomicU64,
    /// Connections accepted so far.
    accepted: AtomicU64,
    stop: AtomicBool,
    /// Serializes mode changes.
    switching: Mutex<()>,
}

/// A proxy from a loopback port of its own to `127.0.0.1:<upstream>`; stops on drop.
pub struct Proxy {
    /// The port clients connect to.
    pub port: u16,
    /// Where it forwards.
    pub _upstream: u16,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Starts forwarding (in [`Mode::Pass`]) to `127.0.0.1:upstream`.
    pub fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let shared = Arc::new(Shared {
            mode: AtomicU8::new(Mode::Pass as u8),
            resets: AtomicU64::new(0),
            conns: Mutex::new(Vec::new()),
            held: AtomicU64::new(0),
            released: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            switching: Mutex::new(()),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name(format!("proxy-{port}"))
            .spawn(move || accept_loop(listener, upstream, s))
            .unwrap();
        Proxy { port, _upstream: upstream, shared }
    }

    /// The URL a NATS client uses to go through the proxy.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The mode now.
    pub fn mode(&self) -> Mode {
        Mode::from(self.shared.mode.load(Ordering::SeqCst))
    }

    /// Switches the mode. Into [`Mode::Hard`]: every connection is closed now. Out of
    /// [`Mode::HalfOpen`]: every connection is reset and what it held is dropped. Out of
    /// [`Mode::Hold`]: the held bytes are delivered, in order, by the pumps within a tick.
    pub fn set(&self, mode: Mode) {
        let _one_at_a_time = self.shared.switching.lock().unwrap();
        let old = self.mode();
        let close_all = || {
            let conns: Vec<Arc<Conn>> = self.shared.conns.lock().unwrap().drain(..).collect();
            for c in conns {
                c.close();
            }
        };
        if old == Mode::HalfOpen && mode != Mode::HalfOpen {
            // Reset before anything flows again: no pump may deliver what it held.
            self.shared.resets.fetch_add(1, Ordering::SeqCst);
            close_all();
        }
        self.shared.mode.store(mode as u8, Ordering::SeqCst);
        if mode == Mode::Hard {
            close_all();
        }
    }

    /// [`Mode::Pass`]: forward again (what that does to held bytes depends on the cut).
    pub fn heal(&self) {
        self.set(Mode::Pass);
    }

    /// [`Mode::Hard`].
    pub fn hard(&self) {
        self.set(Mode::Hard);
    }

    /// [`Mode::HalfOpen`].
    pub fn half_open(&self) {
        self.set(Mode::HalfOpen);
    }

    /// [`Mode::Hold`].
    pub fn hold(&self) {
        self.set(Mode::Hold);
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        let mut conns = self.shared.conns.lock().unwrap();
        conns.retain(|c| !c.closed.load(Ordering::SeqCst));
        conns.len()
    }

    /// Connections accepted so far (a client reconnecting shows here).
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Bytes held now (read during a cut, not delivered yet).
    pub fn held_bytes(&self) -> u64 {
        self.shared.held.load(Ordering::SeqCst)
    }

    /// Bytes delivered late after holds, so far.
    pub fn released_bytes(&self) -> u64 {
        self.shared.released.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let conns: Vec<Arc<Conn>> = self.shared.conns.lock().unwrap().drain(..).collect();
        for c in conns {
            c.close();
        }
    }
}

fn accept_loop(listener: TcpListener, upstream: u16, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        let down = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(TICK);
                continue;
            }
            Err(_) => {
                std::thread::sleep(TICK);
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let _ = down.set_nonblocking(false);
        if Mode::from(shared.mode.load(Ordering::SeqCst)) == Mode::Hard {
            refuse(down);
            continue;
        }
        let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
            refuse(down);
            continue;
        };
        let _ = down.set_nodelay(true);
        let _ = up.set_nodelay(true);
        let conn = Arc::new(Conn {
            down: down.try_clone().unwrap(),
            up: up.try_clone().unwrap(),
            closed: AtomicBool::new(false),
        });
        shared.conns.lock().unwrap().push(conn.clone());
        for (from, to) in [(down.try_clone().unwrap(), up.try_clone().unwrap()), (up.try_clone().unwrap(), down.try_clone().unwrap())] {
            let (shared, conn) = (shared.clone(), conn.clone());
            std::thread::spawn(move || pump(from, to, &shared, &conn));
        }
    }
}

/// Closes a connection at once, with a reset (SO_LINGER 0), as a refused one looks.
fn refuse(s: TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setting a socket option on a socket we own, with a valid struct.
    unsafe {
        use std::os::fd::AsRawFd;
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(s);
}

/// Copies `from` to `to` following the mode, until either side closes.
fn pump(mut from: TcpStream, mut to: TcpStream, shared: &Shared, conn: &Conn) {
    let _ = from.set_read_timeout(Some(TICK));
    let mut buf = vec![0u8; 64 * 1024];
    let mut held: Vec<u8> = Vec::new();
    let mut eof = false;
    let mut epoch = shared.resets.load(Ordering::SeqCst);
    let unhold = |held: &mut Vec<u8>| {
        shared.held.fetch_sub(held.len() as u64, Ordering::SeqCst);
        held.clear();
    };
    loop {
        if conn.closed.load(Ordering::SeqCst) || shared.stop.load(Ordering::SeqCst) {
            unhold(&mut held);
            conn.close();
            return;
        }
        let mode = Mode::from(shared.mode.load(Ordering::SeqCst));
        let resets = shared.resets.load(Ordering::SeqCst);
        if resets != epoch {
            // A heal from half-open: what this connection held is gone (and it is reset).
            epoch = resets;
            unhold(&mut held);
        }
        if mode == Mode::Pass && !held.is_empty() {
            let n = held.len() as u64;
            if to.write_all(&held).is_err() {
                unhold(&mut held);
                conn.close();
                return;
            }
            shared.released.fetch_add(n, Ordering::SeqCst);
            unhold(&mut held);
        }
        if eof {
            if mode == Mode::Pass {
                // The peer's end-of-file, after everything it sent.
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            std::thread::sleep(TICK);
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => eof = true,
            Ok(n) => {
                let mode = Mode::from(shared.mode.load(Ordering::SeqCst));
                if mode == Mode::Pass && held.is_empty() {
                    if to.write_all(&buf[..n]).is_err() {
                        conn.close();
                        return;
                    }
                } else {
                    held.extend_from_slice(&buf[..n]);
                    shared.held.fetch_add(n as u64, Ordering::SeqCst);
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(_) => {
                unhold(&mut held);
                conn.close();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// An echo server on loopback: every connection gets its bytes back.
    fn echo_server() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { return };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        port
    }

    fn client(p: &Proxy) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    }

    /// Reads exactly `n` bytes, or what came before an error / timeout.
    fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut out = vec![0u8; n];
        let mut got = 0;
        while got < n {
            match s.read(&mut out[got..]) {
                Ok(0) | Err(_) => break,
                Ok(k) => got += k,
            }
        }
        out.truncate(got);
        out
    }

    /// What a read sees within `wait`: bytes, end-of-file / reset, or nothing (timeout).
    #[derive(Debug, PartialEq)]
    enum Seen {
        Bytes(Vec<u8>),
        Closed,
        Nothing,
    }

    fn peek(s: &mut TcpStream, wait: Duration) -> Seen {
        s.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 4096];
        let seen = match s.read(&mut buf) {
            Ok(0) => Seen::Closed,
            Ok(n) => Seen::Bytes(buf[..n].to_vec()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Seen::Nothing,
            Err(_) => Seen::Closed,
        };
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        seen
    }

    #[test]
    fn pass_through_echoes_both_ways() {
        let p = Proxy::start(echo_server());
        let mut c = client(&p);
        for i in 0..50 {
            let msg = format!("hello {i}\n");
            c.write_all(msg.as_bytes()).unwrap();
            assert_eq!(read_n(&mut c, msg.len()), msg.as_bytes());
        }
        // A large payload, both directions at once.
        let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut w = c.try_clone().unwrap();
        let b2 = big.clone();
        let t = std::thread::spawn(move || w.write_all(&b2).unwrap());
        assert_eq!(read_n(&mut c, big.len()), big);
        t.join().unwrap();
        assert_eq!(p.connections(), 1);
        assert_eq!(p.accepted(), 1);
    }

    #[test]
    fn hard_partition_closes_connections_and_refuses_new_ones() {
        let p = Proxy::start(echo_server());
        let mut c = client(&p);
        c.write_all(b"x").unwrap();
        assert_eq!(read_n(&mut c, 1), b"x");
        p.hard();
        assert_eq!(peek(&mut c, Duration::from_secs(2)), Seen::Closed, "an existing connection is closed");
        assert_eq!(p.connections(), 0);
        // A new connection is closed at once (reset or end-of-file), before any byte flows.
        let mut n = client(&p);
        let _ = n.write_all(b"y");
        assert_eq!(peek(&mut n, Duration::from_secs(2)), Seen::Closed);
        p.heal();
        let mut c = client(&p);
        c.write_all(b"back").unwrap();
        assert_eq!(read_n(&mut c, 4), b"back");
    }

    #[test]
    fn half_open_forwards_nothing_keeps_sockets_open_and_resets_at_heal() {
        let p = Proxy::start(echo_server());
        let mut c = client(&p);
        c.write_all(b"before").unwrap();
        assert_eq!(read_n(&mut c, 6), b"before");
        p.half_open();
        c.write_all(b"lost").unwrap();
        // Nothing comes back, and the socket is not closed: a dead link nobody reports.
        assert_eq!(peek(&mut c, Duration::from_millis(500)), Seen::Nothing);
        assert_eq!(p.connections(), 1);
        // New connections are accepted, and stall the same way.
        let mut n = client(&p);
        n.write_all(b"new").unwrap();
        assert_eq!(peek(&mut n, Duration::from_millis(300)), Seen::Nothing);
        assert!(p.held_bytes() >= 4, "held {}", p.held_bytes());
        // At heal, connections that lived through the cut are reset; nothing held arrives.
        p.heal();
        assert_eq!(peek(&mut c, Duration::from_secs(2)), Seen::Closed);
        assert_eq!(peek(&mut n, Duration::from_secs(2)), Seen::Closed);
        assert_eq!(p.released_bytes(), 0);
        let mut c = client(&p);
        c.write_all(b"after").unwrap();
        assert_eq!(read_n(&mut c, 5), b"after");
    }

    #[test]
    fn hold_delivers_held_bytes_late_in_order() {
        let p = Proxy::start(echo_server());
        let mut c = client(&p);
        c.write_all(b"a1").unwrap();
        assert_eq!(read_n(&mut c, 2), b"a1");
        p.hold();
        let t0 = Instant::now();
        c.write_all(b"b2").unwrap();
        c.write_all(b"c3").unwrap();
        assert_eq!(peek(&mut c, Duration::from_millis(500)), Seen::Nothing);
        assert_eq!(p.connections(), 1);
        p.heal();
        // The held bytes arrive after the heal, whole and in order, then the link carries on.
        assert_eq!(read_n(&mut c, 4), b"b2c3");
        assert!(t0.elapsed() >= Duration::from_millis(500));
        assert!(p.released_bytes() >= 4);
        c.write_all(b"d4").unwrap();
        assert_eq!(read_n(&mut c, 2), b"d4");
    }

    #[test]
    fn hold_delivers_bytes_a_closed_client_sent_then_its_end_of_file() {
        // The late retransmission of a connection its client gave up on: the server gets the
        // bytes after the client left.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let got = Arc::new(Mutex::new(None::<(Vec<u8>, Instant)>));
        let g = got.clone();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut all = Vec::new();
            s.read_to_end(&mut all).unwrap();
            *g.lock().unwrap() = Some((all, Instant::now()));
        });
        let p = Proxy::start(port);
        let mut c = client(&p);
        p.hold();
        c.write_all(b"PUB late 1\r\nx\r\n").unwrap();
        drop(c);
        std::thread::sleep(Duration::from_millis(300));
        assert!(got.lock().unwrap().is_none(), "nothing reached the server during the hold");
        let healed = Instant::now();
        p.heal();
        let ok = crate::harness::wait_for(Duration::from_secs(3), || got.lock().unwrap().is_some());
        assert!(ok, "the held bytes and end-of-file never reached the server");
        let (bytes, at) = got.lock().unwrap().clone().unwrap();
        assert_eq!(bytes, b"PUB late 1\r\nx\r\n");
        assert!(at >= healed);
    }
}
