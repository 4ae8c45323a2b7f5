//! Policy changes that move paths between tiers (issue 10, defect 10), and crash-interrupted
//! creates and durable fsyncs (defect 7): two nodes, a real nats-server and a real git remote.

use std::path::Path;

use crate::git::{wait_pushed, Remote, QUICK};
use crate::harness::{wait_content, Mount, Options};
use crate::nats::NatsServer;

const BEFORE: &str = r#"policies:
  - pattern: "a/**"
    tier: git
    consistency: lww
  - pattern: "b/**"
    tier: nats-kv
    consistency: lww
  - pattern: "c/**"
    tier: git
    consistency: lww
  - pattern: "d/**"
    tier: nats-kv
    consistency: lww
"#;

const AFTER: &str = r#"policies:
  - pattern: "a/**"
    tier: nats-kv
    consistency: lww
  - pattern: "b/**"
    tier: git
    consistency: lww
  - pattern: "c/**"
    tier: nats-stream
    consistency: append
  - pattern: "d/**"
    tier: nats-stream
    consistency: append
"#;

fn opts(name: &str, remote: &Remote, nats: &NatsServer) -> Options {
    Options {
        node: Some(name.into()),
        nats: vec![nats.url()],
        git_remote: Some(remote.path.display().to_string()),
        config: Some(QUICK.into()),
        policies: Some(BEFORE.into()),
        ..Default::default()
    }
}

fn remount(m: &mut Mount, o: &Options) {
    let out = m.try_mount(o);
    assert!(out.status.success(), "remount failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn tier_of(path: &Path) -> String {
    let out = std::process::Command::new("getfattr").args(["--only-values", "-n", "user.syncfs.tier"]).arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every message a subject of `stream` holds: (payload, operation header).
fn messages(url: &str, stream: &str, subject: &str) -> Vec<(Vec<u8>, Option<String>)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = async_nats::connect(url).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let Ok(mut s) = js.get_stream(stream).await else { return Vec::new() };
        let state = s.info().await.unwrap().state.clone();
        let mut out = Vec::new();
        if state.messages == 0 {
            return out;
        }
        for seq in state.first_sequence..=state.last_sequence {
            let Ok(m) = s.get_raw_message(seq).await else { continue };
            if m.subject.as_str() == subject {
                let op = m.headers.get("KV-Operation").or(m.headers.get("Syncfs-Op")).map(|v| v.as_str().to_string());
                out.push((m.payload.to_vec(), op));
            }
        }
        out
    })
}

fn kv_subject(pattern: &str, path: &str) -> (String, String) {
    let bucket = syncfs::tier::kv::bucket_name(pattern);
    let key = syncfs::tier::kv::key::encode(Path::new(path)).unwrap();
    (format!("KV_{bucket}"), format!("$KV.{bucket}.{key}"))
}

fn stream_subject(pattern: &str, path: &str) -> (String, String) {
    let name = syncfs::tier::kv::bucket_name(pattern);
    let key = syncfs::tier::kv::key::encode(Path::new(path)).unwrap();
    (name.clone(), format!("syncfs.log.{name}.{key}"))
}

/// git → nats-kv, nats-kv → git, git → nats-stream and nats-kv → nats-stream: after both
/// nodes remount with the new table, each file has its content on both nodes, in its new tier,
/// once, and its old tier no longer holds it.
#[test]
fn a_policy_change_moves_content_to_the_new_tier_on_both_nodes() {
    let nats = NatsServer::start();
    let remote = Remote::new();
    let (oa, ob) = (opts("node-a", &remote, &nats), opts("node-b", &remote, &nats));
    let mut a = Mount::with(oa.clone());
    let mut b = Mount::with(ob.clone());
    let files = [
        ("a/ids.yml", "ids:\n  - 1\n  - 2\n"),
        ("b/state.yml", "state: running\n"),
        ("c/events.log", "one\ntwo\n"),
        ("d/trail.log", "kv line\n"),
    ];
    for (p, c) in files {
        a.sh_ok(&format!("mkdir -p {} && printf '{}' > {p}", Path::new(p).parent().unwrap().display(), c.replace('\n', "\\n")));
    }
    wait_pushed(&a);
    for (p, c) in files {
        assert!(wait_content(&b.path(p), c), "{p} did not reach node B before the change");
    }
    // The new table, written on A, reaches B through git.
    std::fs::write(a.path(".syncfs/policies.yml"), AFTER).unwrap();
    wait_pushed(&a);
    assert!(wait_content(&b.path(".syncfs/policies.yml"), AFTER), "the new table did not reach B");
    a.umount();
    b.umount();
    remount(&mut a, &oa);
    remount(&mut b, &ob);
    let expected_tier = [("a/ids.yml", "nats-kv"), ("b/state.yml", "git"), ("c/events.log", "nats-stream"), ("d/trail.log", "nats-stream")];
    for (m, name) in [(&a, "A"), (&b, "B")] {
        for ((p, c), (_, tier)) in files.iter().zip(expected_tier) {
            assert!(wait_content(&m.path(p), c), "{p} on node {name}: {:?}", std::fs::read_to_string(m.path(p)));
            assert_eq!(tier_of(&m.path(p)), tier, "{p} on node {name}");
        }
    }
    wait_pushed(&a);
    wait_pushed(&b);
    assert_eq!(remote.show("a/ids.yml"), None, "a/ids.yml left behind in git");
    assert_eq!(remote.show("c/events.log"), None, "c/events.log left behind in git");
    assert_eq!(remote.show("b/state.yml").as_deref(), Some("state: running\n"));
    let url = nats.url();
    let (s, subj) = kv_subject("a/**", "a/ids.yml");
    let values: Vec<_> = messages(&url, &s, &subj).into_iter().filter(|(_, op)| op.is_none()).collect();
    assert_eq!(values.len(), 1, "a/ids.yml must be created once in KV: {values:?}");
    assert_eq!(values[0].0, b"ids:\n  - 1\n  - 2\n");
    for (pattern, path) in [("b/**", "b/state.yml"), ("d/**", "d/trail.log")] {
        let (s, subj) = kv_subject(pattern, path);
        let last = messages(&url, &s, &subj).pop();
        assert!(matches!(&last, Some((_, Some(op))) if op == "DEL"), "{path} left behind in its old bucket: {last:?}");
    }
    for (path, content) in [("c/events.log", "one\ntwo\n"), ("d/trail.log", "kv line\n")] {
        let (s, subj) = stream_subject(path.split('/').next().map(|d| format!("{d}/**")).unwrap().as_str(), path);
        let msgs = messages(&url, &s, &subj);
        assert_eq!(msgs, vec![(content.as_bytes().to_vec(), None)], "{path} must be one message in its stream");
    }
    // A third mount of each node changes nothing (the moves are done).
    a.umount();
    remount(&mut a, &oa);
    for (p, c) in files {
        assert!(wait_content(&a.path(p), c), "{p} after another remount");
    }
    let log = std::fs::read_to_string(a.state.join("syncfs.log")).unwrap_or_default();
    assert!(log.contains("moved"), "the moves are logged:\n{log}");
}
