//! Real nats-server processes for the tests, on loopback ports chosen here.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_listening(port: u16, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("nats-server exited ({status}): {}", std::fs::read_to_string(log).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nats-server did not listen on {port}");
}

/// One nats-server with JetStream; killed on drop.
pub struct NatsServer {
    child: Option<Child>,
    /// Client port.
    pub port: u16,
    dir: PathBuf,
    args: Vec<String>,
    _tmp: Option<tempfile::TempDir>,
}

impl NatsServer {
    /// A standalone server with its own store.
    pub fn start() -> NatsServer {
        NatsServer::start_with(&[])
    }

    /// A standalone server with extra command-line options (e.g. `--user`, `--pass`).
    pub fn start_with(extra: &[&str]) -> NatsServer {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let port = free_port();
        let mut s = NatsServer {
            child: None,
            port,
            args: vec![],
            dir,
            _tmp: Some(tmp),
        };
        s.args = vec!["-js".into(), "-a".into(), "127.0.0.1".into(), "-p".into(), port.to_string()];
        s.args.extend(extra.iter().map(|a| a.to_string()));
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = self.dir.join("server.log");
        let mut child = Command::new("nats-server")
            .args(&self.args)
            .arg("-sd")
            .arg(&self.dir)
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (scripts/install-deps.sh installs it)");
        wait_listening(self.port, &mut child, &log);
        self.child = Some(child);
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server gracefully (SIGTERM: JetStream flushes its store, which it otherwise
    /// syncs only every two minutes), by force after 10 s. Clients see the connection drop.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A 3-node JetStream cluster on loopback.
pub struct NatsCluster {
    /// The servers.
    pub servers: Vec<NatsServer>,
    _tmp: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts three clustered servers and waits until JetStream can place three replicas.
    pub fn start() -> NatsCluster {
        let tmp = tempfile::tempdir().unwrap();
        let client_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes = route_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut servers = Vec::new();
        for i in 0..3 {
            let dir = tmp.path().join(format!("s{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            let mut s = NatsServer {
                child: None,
                port: client_ports[i],
                dir,
                args: vec![
                    "-js".into(),
                    "-a".into(),
                    "127.0.0.1".into(),
                    "-p".into(),
                    client_ports[i].to_string(),
                    "-n".into(),
                    format!("s{i}"),
                    "--cluster_name".into(),
                    "syncfs-test".into(),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{}", route_ports[i]),
                    "--routes".into(),
                    routes.clone(),
                ],
                _tmp: None,
            };
            s.spawn();
            servers.push(s);
        }
        let cluster = NatsCluster { servers, _tmp: tmp };
        cluster.wait_for_jetstream();
        cluster
    }

    fn wait_for_jetstream(&self) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let url = self.servers[0].url();
        let ok = rt.block_on(async {
            let client = async_nats::connect(url).await.unwrap();
            let js = async_nats::jetstream::new(client);
            // A meta leader is not enough: a bucket with three replicas needs all three
            // servers to be JetStream peers, which a loaded machine can take seconds to reach.
            for _ in 0..600 {
                let probe = async_nats::jetstream::stream::Config {
                    name: "syncfs_test_probe".into(),
                    subjects: vec!["syncfs.test.probe".into()],
                    num_replicas: 3,
                    ..Default::default()
                };
                if js.query_account().await.is_ok() && js.create_stream(probe).await.is_ok() {
                    let _ = js.delete_stream("syncfs_test_probe").await;
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        });
        assert!(ok, "the JetStream cluster did not come up");
    }
}

/// A fake server that says it is nats-server 2.9.10 and answers PINGs.
pub struct OldServer {
    /// Its port.
    pub port: u16,
}

impl OldServer {
    /// Starts listening in a thread.
    pub fn start() -> OldServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                std::thread::spawn(move || {
                    let info = format!(
                        "INFO {{\"server_id\":\"OLD\",\"server_name\":\"old\",\"version\":\"2.9.10\",\"proto\":1,\"host\":\"127.0.0.1\",\"port\":{port},\"headers\":true,\"max_payload\":1048576,\"jetstream\":true}}\r\n"
                    );
                    let _ = stream.write_all(info.as_bytes());
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut line = String::new();
                    while reader.read_line(&mut line).unwrap_or(0) > 0 {
                        if line.starts_with("PING") {
                            let _ = stream.write_all(b"PONG\r\n");
                        }
                        line.clear();
                    }
                });
            }
        });
        OldServer { port }
    }
}

// --- Fault helpers (mount-tests/faults.rs): signals, a restart after a kill, the log. ---

impl NatsServer {
    /// The server's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` to the server (SIGSTOP, SIGCONT, ...).
    pub fn signal(&self, signal: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid as i32, signal) };
        }
    }

    /// `kill -9`: JetStream gets no chance to flush (the OS keeps what it wrote).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and store after [`NatsServer::stop`] or
    /// [`NatsServer::kill9`].
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the server still runs");
        self.spawn();
    }

    /// Whether it runs now.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}
