//! Locks the way programs take them: directory claims (`mkdir` as a cluster-wide exclusive
//! create on `cas`/`cas-create` paths, broken by `rename`, released by `rmdir`).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, SystemTime};

use crate::harness::{wait_for, Mount, Options};
use crate::nats::NatsServer;

const TABLE: &str = r#"
policies:
  - pattern: "fast/claims/**"
    tier: nats-kv
    consistency: cas-create
    ttl: 300
    ephemeral: true
  - pattern: "fast/eph/**"
    tier: nats-kv
    consistency: cas-create
    ttl: 2
    ephemeral: true
  - pattern: "fast/casual/**"
    tier: nats-kv
    consistency: lww
"#;

fn node(name: &str, server: &NatsServer) -> Mount {
    Mount::with(Options {
        node: Some(name.into()),
        nats: vec![server.url()],
        policies: Some(TABLE.into()),
        ..Default::default()
    })
}

/// `mkdir(2)`: Ok, or the errno.
fn mkdir(path: &Path) -> Result<(), i32> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string.
    if unsafe { libc::mkdir(c.as_ptr(), 0o755) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(-1))
    }
}

/// `rename(2)`: Ok, or the errno.
fn rename(from: &Path, to: &Path) -> Result<(), i32> {
    std::fs::rename(from, to).map_err(|e| e.raw_os_error().unwrap_or(-1))
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).ok()?.modified().ok()
}

fn apart(a: SystemTime, b: SystemTime) -> Duration {
    a.duration_since(b).or_else(|_| b.duration_since(a)).unwrap_or_default()
}

#[test]
fn mkdir_on_a_claim_path_has_one_winner_per_name_across_nodes() {
    let server = NatsServer::start();
    let (a, b) = (Arc::new(node("a", &server)), Arc::new(node("b", &server)));
    const ROUNDS: usize = 20;
    let mut winners = Vec::new();
    for round in 0..ROUNDS {
        let name = format!("fast/claims/race-{round}.lock");
        let barrier = Arc::new(Barrier::new(2));
        let racers: Vec<_> = [a.clone(), b.clone()]
            .into_iter()
            .map(|m| {
                let (barrier, path) = (barrier.clone(), m.path(&name));
                std::thread::spawn(move || {
                    barrier.wait();
                    mkdir(&path)
                })
            })
            .collect();
        let results: Vec<_> = racers.into_iter().map(|h| h.join().unwrap()).collect();
        let won: Vec<usize> = results.iter().enumerate().filter(|(_, r)| r.is_ok()).map(|(i, _)| i).collect();
        assert_eq!(won.len(), 1, "round {round}: exactly one mkdir wins: {results:?}");
        let lost = results.iter().find(|r| r.is_err()).unwrap();
        assert_eq!(*lost, Err(libc::EEXIST), "round {round}: the loser gets EEXIST");
        winners.push(won[0]);
    }
    // Every claim is on both nodes, with one age: the marker's creation time.
    let later = node("c", &server);
    std::thread::sleep(Duration::from_millis(1500));
    for round in 0..ROUNDS {
        let name = format!("fast/claims/race-{round}.lock");
        assert!(wait_for(Duration::from_secs(5), || b.path(&name).is_dir() && a.path(&name).is_dir()), "{name} on both nodes");
        let (ta, tb, tc) = (mtime(&a.path(&name)).unwrap(), mtime(&b.path(&name)).unwrap(), mtime(&later.path(&name)).unwrap());
        assert!(apart(ta, tb) < Duration::from_millis(500), "{name}: mtime {ta:?} on a, {tb:?} on b");
        assert!(apart(ta, tc) < Duration::from_millis(500), "{name}: a node mounted later shows mtime {tc:?}, not the claim's {ta:?}");
    }
    // rmdir releases: the loser takes it next, and the winner cannot take it back.
    let name = "fast/claims/race-0.lock";
    let (winner, loser) = if winners[0] == 0 { (&a, &b) } else { (&b, &a) };
    std::fs::remove_dir(winner.path(name)).unwrap();
    assert!(wait_for(Duration::from_secs(5), || !loser.path(name).exists()), "the release reaches the other node");
    assert!(wait_for(Duration::from_secs(5), || mkdir(&loser.path(name)).is_ok()), "the released name can be claimed");
    assert!(wait_for(Duration::from_secs(5), || winner.path(name).is_dir()));
    assert_eq!(mkdir(&winner.path(name)), Err(libc::EEXIST));
}

#[test]
fn a_stale_lock_directory_is_broken_by_one_rename_only() {
    let server = NatsServer::start();
    let ns: Vec<Arc<Mount>> = ["a", "b", "c"].iter().map(|n| Arc::new(node(n, &server))).collect();
    for round in 0..5 {
        let lock = format!("fast/claims/ids-{round}.yml.lock");
        mkdir(&ns[0].path(&lock)).unwrap();
        for m in &ns[1..] {
            assert!(wait_for(Duration::from_secs(5), || m.path(&lock).is_dir()));
        }
        // b and c both find it stale and break it as tbd does: rename to a unique name.
        let barrier = Arc::new(Barrier::new(2));
        let breakers: Vec<_> = ns[1..]
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let (barrier, m, lock) = (barrier.clone(), m.clone(), lock.clone());
                std::thread::spawn(move || {
                    let stale = format!("{lock}.stale-{i}");
                    barrier.wait();
                    (rename(&m.path(&lock), &m.path(&stale)), stale)
                })
            })
            .collect();
        let results: Vec<_> = breakers.into_iter().map(|h| h.join().unwrap()).collect();
        let won: Vec<_> = results.iter().filter(|(r, _)| r.is_ok()).collect();
        assert_eq!(won.len(), 1, "round {round}: one breaker wins: {results:?}");
        for (r, stale) in &results {
            match r {
                Ok(()) => {
                    for m in &ns {
                        assert!(wait_for(Duration::from_secs(5), || m.path(stale).is_dir()), "{stale} everywhere");
                    }
                }
                Err(e) => {
                    assert!(matches!(*e, libc::ENOENT | libc::ESTALE), "round {round}: the late breaker gets ENOENT or ESTALE, got {e}");
                    for m in &ns {
                        assert!(wait_for(Duration::from_secs(5), || !m.path(stale).exists()), "the loser's {stale} is given back");
                    }
                }
            }
        }
        let (_, stale) = won[0];
        for m in &ns {
            assert!(wait_for(Duration::from_secs(5), || !m.path(&lock).exists()), "the broken lock is gone everywhere");
        }
        // The breaker removes the stale copy; the lock can be taken again, by one node.
        let breaker = &ns[1 + results.iter().position(|(r, _)| r.is_ok()).unwrap()];
        std::fs::remove_dir(breaker.path(stale)).unwrap();
        assert!(wait_for(Duration::from_secs(5), || mkdir(&ns[2].path(&lock)).is_ok()));
        assert!(wait_for(Duration::from_secs(5), || ns[1].path(&lock).is_dir()));
        assert_eq!(mkdir(&ns[1].path(&lock)), Err(libc::EEXIST));
    }
}

#[test]
fn a_refused_directory_rename_is_logged_once_not_per_retry() {
    let server = NatsServer::start();
    let a = node("a", &server);
    std::fs::create_dir(a.path("fast/casual/d")).unwrap();
    std::fs::write(a.path("fast/casual/d/x"), "x").unwrap();
    for _ in 0..300 {
        assert_eq!(rename(&a.path("fast/casual/d"), &a.path("fast/casual/e")), Err(libc::EXDEV));
    }
    let log = std::fs::read_to_string(a.state.join("syncfs.log")).unwrap();
    let warned = log.lines().filter(|l| l.contains("WARN") && l.contains("fast/casual/d")).count();
    assert!((1..=2).contains(&warned), "{warned} warnings for 300 refused renames:\n{log}");
}
