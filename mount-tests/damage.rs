//! Damaged state on disk (issue 10, defect 6): a damaged offline journal or stream state file
//! must not lose acknowledged writes silently. Each test kills a daemon with -9, damages what
//! it left in `--state` the way disks and people do, remounts, and checks what survived.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::harness::{syncfs, wait_for, Mount, Options};
use crate::nats::NatsServer;

const KV_TABLE: &str = r#"
policies:
  - pattern: "fast/casual/**"
    tier: nats-kv
    consistency: lww
"#;

const STREAM_TABLE: &str = r#"
policies:
  - pattern: "log/**"
    tier: nats-stream
    consistency: append
"#;

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn opts(name: &str, server: &NatsServer, table: &str) -> Options {
    Options {
        node: Some(name.into()),
        nats: vec![server.url()],
        policies: Some(table.into()),
        ..Default::default()
    }
}

/// Kills the daemon of `m` with SIGKILL and detaches its dead mount.
fn kill9(m: &mut Mount) {
    let pid = m.pid();
    // SAFETY: killing our own daemon.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert!(wait_for(Duration::from_secs(10), || !syncfs::daemon::process_alive(
        pid
    )));
    let out = syncfs(&["umount", &m.mnt.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    m.forget_mounted();
}

/// What the daemon logged from byte `from` of its log on.
fn log_since(m: &Mount, from: usize) -> String {
    let log = std::fs::read(m.state.join("syncfs.log")).unwrap_or_default();
    String::from_utf8_lossy(&log[from.min(log.len())..]).into_owned()
}

fn log_len(m: &Mount) -> usize {
    std::fs::metadata(m.state.join("syncfs.log")).map_or(0, |md| md.len() as usize)
}

/// One journal record as the test sees it: where its frame is, and its key.
struct Frame {
    start: usize,
    end: usize,
    key: String,
}

/// Reads the frames of an intact journal, in either record format: `SJR1` (before issue 10:
/// `magic, meta len, meta, value len, value, CRC-32`) or `SJR2` (a 40-byte header: magic, salt,
/// sequence, meta len, value len, meta CRC, value CRC, header CRC; then meta and value). The
/// test reads both so that it runs, and fails for the right reason, against the old format.
fn frames(data: &[u8]) -> Vec<Frame> {
    let u32_at = |i: usize| u32::from_le_bytes(data[i..i + 4].try_into().unwrap()) as usize;
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let (meta_at, meta_len, end) = match &data[at..at + 4] {
            b"SJR1" => {
                let meta_len = u32_at(at + 4);
                let value_len = u32_at(at + 8 + meta_len);
                (at + 8, meta_len, at + 8 + meta_len + 4 + value_len + 4)
            }
            b"SJR2" => {
                let (meta_len, value_len) = (u32_at(at + 20), u32_at(at + 24));
                (at + 40, meta_len, at + 40 + meta_len + value_len)
            }
            other => panic!("an intact journal at {at}: {other:?}"),
        };
        let meta: serde_json::Value = serde_json::from_slice(&data[meta_at..meta_at + meta_len]).unwrap();
        out.push(Frame {
            start: at,
            end,
            key: meta["key"].as_str().unwrap().to_string(),
        });
        at = end;
    }
    out
}

/// A way to damage a journal: the damaged bytes, and which records (by index) it leaves
/// intact.
struct Case {
    name: &'static str,
    /// Whether the damage is only a torn last append (its `close()` never returned), which
    /// is dropped without a report.
    torn: bool,
    damage: fn(&[u8], &[Frame]) -> (Vec<u8>, Vec<bool>),
}

/// Records whose bytes the damage did not change, for damage that keeps the length.
fn unchanged(before: &[u8], after: &[u8], f: &[Frame]) -> Vec<bool> {
    f.iter()
        .map(|r| before[r.start..r.end] == after[r.start..r.end])
        .collect()
}

const CASES: &[Case] = &[
    Case {
        name: "a flipped bit in record 9 of 30",
        torn: false,
        damage: |d, f| {
            let mut out = d.to_vec();
            let r = &f[9];
            out[(r.start + r.end) / 2] ^= 0x08;
            let keep = unchanged(d, &out, f);
            (out, keep)
        },
    },
    Case {
        name: "a cut in the middle (bytes from record 12 to record 14 removed)",
        torn: false,
        damage: |d, f| {
            let (from, to) = ((f[12].start + f[12].end) / 2, (f[14].start + f[14].end) / 2);
            let out = [&d[..from], &d[to..]].concat();
            let keep = f.iter().map(|r| r.end <= from || r.start >= to).collect();
            (out, keep)
        },
    },
    Case {
        name: "a flipped first byte",
        torn: false,
        damage: |d, f| {
            let mut out = d.to_vec();
            out[0] ^= 0xff;
            let keep = unchanged(d, &out, f);
            (out, keep)
        },
    },
    Case {
        name: "a zeroed 4 KiB page",
        torn: false,
        damage: |d, f| {
            let mut out = d.to_vec();
            out[4096..8192].fill(0);
            let keep = unchanged(d, &out, f);
            (out, keep)
        },
    },
    Case {
        name: "a torn last append",
        torn: true,
        damage: |d, f| {
            let out = d[..d.len() - 7].to_vec();
            let keep = (0..f.len()).map(|i| i + 1 < f.len()).collect();
            (out, keep)
        },
    },
];

/// 30 acknowledged last-write-wins writes wait in the journal of a node killed with -9; the
/// journal is damaged in each of the ways issue 10 lists. After a remount with NATS back,
/// every write whose record is intact reaches another node (the ones after the damage
/// included), the damaged ones are the only ones missing, and the log names the loss (a
/// torn last append excepted: nothing acknowledged is lost there) with a copy of the
/// damaged journal kept next to it.
#[test]
fn a_damaged_journal_loses_only_its_damaged_records_and_says_so() {
    for case in CASES {
        let mut server = NatsServer::start();
        let mut a = Mount::with(opts("a", &server, KV_TABLE));
        let b = Mount::with(opts("b", &server, KV_TABLE));
        server.stop();
        assert!(wait_for(Duration::from_secs(10), || a.status()["nats"]["state"]
            == "disconnected"));
        let mut want = BTreeMap::new();
        for i in 0..30 {
            // Over 4 KiB of journal a page, so a zeroed page leaves records on both sides. Each
            // value is its own (no run of one byte), so no cut can splice two records into one
            // that checks.
            let value = format!("write {i:02} {}\n", format!("<{i:02}>").repeat(100 + i));
            std::fs::write(a.path(&format!("fast/casual/k{i:02}")), &value).unwrap();
            want.insert(format!("fast.casual.k{i:02}"), (format!("fast/casual/k{i:02}"), value));
        }
        assert_eq!(a.status()["pending_writes"], 30, "{}: every write is queued", case.name);
        kill9(&mut a);

        let journal = a.state.join("journal/kv.log");
        let data = std::fs::read(&journal).unwrap();
        let f = frames(&data);
        assert_eq!(f.len(), 30, "{}: one record per write", case.name);
        assert!(data.len() > 3 * 4096, "{}: the journal spans several pages", case.name);
        let (damaged, keep) = (case.damage)(&data, &f);
        std::fs::write(&journal, &damaged).unwrap();
        let lost: Vec<&str> = f
            .iter()
            .zip(&keep)
            .filter(|(_, k)| !**k)
            .map(|(r, _)| r.key.as_str())
            .collect();
        assert!(
            !lost.is_empty() && lost.len() < 30,
            "{}: the case damages some records, not all",
            case.name
        );

        server.restart();
        let from = log_len(&a);
        let out = a.try_mount(&opts("a", &server, KV_TABLE));
        assert!(out.status.success(), "{}: {}", case.name, text(&out));
        let survivors: Vec<&(String, String)> = f
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(r, _)| &want[&r.key])
            .collect();
        let arrived = wait_for(Duration::from_secs(30), || {
            survivors
                .iter()
                .all(|(path, value)| std::fs::read_to_string(b.path(path)).is_ok_and(|c| &c == value))
        });
        let missing: Vec<&str> = survivors
            .iter()
            .filter(|(path, value)| std::fs::read_to_string(b.path(path)).map_or(true, |c| &c != value))
            .map(|(path, _)| path.as_str())
            .collect();
        assert!(
            arrived,
            "{}: intact writes that never reached node b: {missing:?}\nlog:\n{}",
            case.name,
            log_since(&a, from)
        );
        assert!(
            wait_for(Duration::from_secs(10), || a.status()["pending_writes"] == 0),
            "{}",
            case.name
        );
        for key in &lost {
            let path = &want[*key].0;
            assert!(
                !b.path(path).exists(),
                "{}: {path} was damaged, yet node b has it",
                case.name
            );
        }

        let log = log_since(&a, from);
        let copies: Vec<String> = std::fs::read_dir(a.state.join("journal"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("kv.log.damaged-"))
            .collect();
        if case.torn {
            assert!(
                log.contains("torn"),
                "{}: the log names the torn append:\n{log}",
                case.name
            );
            assert!(
                !log.contains("journal is damaged"),
                "{}: a torn append is no damage:\n{log}",
                case.name
            );
            assert!(copies.is_empty(), "{}: {copies:?}", case.name);
        } else {
            assert!(
                log.contains("journal is damaged"),
                "{}: the log names the damage:\n{log}",
                case.name
            );
            let n = lost.len();
            let s = if n == 1 { "" } else { "s" };
            assert!(
                log.contains(&format!("{n} acknowledged write{s} lost")),
                "{}: the log says how many writes were lost ({n}):\n{log}",
                case.name
            );
            assert_eq!(copies.len(), 1, "{}: a copy of the damaged journal is kept", case.name);
            let copy = std::fs::read(a.state.join("journal").join(&copies[0])).unwrap();
            assert_eq!(copy, damaged, "{}: the copy holds the damaged bytes", case.name);
        }
        // `status` says it too, in JSON and in words, until the operator removes the report.
        let damage = a.status()["journal_damage"].clone();
        let human = text(&syncfs(&["status", &a.mnt.display().to_string()]));
        if case.torn {
            assert_eq!(damage, serde_json::json!([]), "{}", case.name);
            assert!(!human.contains("JOURNAL DAMAGE"), "{}: {human}", case.name);
        } else {
            let d = &damage[0];
            assert_eq!(damage.as_array().map(Vec::len), Some(1), "{}: {damage}", case.name);
            assert_eq!(d["lost"], lost.len(), "{}: {damage}", case.name);
            assert_eq!(d["at_least"], false, "{}: {damage}", case.name);
            assert_eq!(d["kept"], 30 - lost.len(), "{}: {damage}", case.name);
            assert!(
                d["copy"].as_str().unwrap().ends_with(&copies[0]),
                "{}: {damage}",
                case.name
            );
            assert!(
                human.contains(&format!(
                    "JOURNAL DAMAGE: {}: {} acknowledged write{} lost",
                    d["found_at"].as_str().unwrap(),
                    lost.len(),
                    if lost.len() == 1 { "" } else { "s" }
                )),
                "{}: {human}",
                case.name
            );
            std::fs::remove_file(d["report"].as_str().unwrap()).unwrap();
            assert_eq!(
                a.status()["journal_damage"],
                serde_json::json!([]),
                "{}: acknowledged",
                case.name
            );
        }
    }
}

/// The stream's content for its only file: every message's payload in order.
fn stream_content(server: &NatsServer, table_pattern: &str) -> String {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = async_nats::connect(server.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let mut stream = js
            .get_stream(syncfs::tier::kv::bucket_name(table_pattern))
            .await
            .unwrap();
        let state = stream.info().await.unwrap().state.clone();
        let mut out = Vec::new();
        for seq in state.first_sequence..=state.last_sequence {
            out.extend_from_slice(&stream.get_raw_message(seq).await.unwrap().payload);
        }
        String::from_utf8(out).unwrap()
    })
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A node's stream state is edited between a kill -9 and its remount so that it is still valid
/// JSON but wrong (a resume point 15 messages ahead, which used to skip 15 lines for good; a
/// file length 100 bytes too long, which used to double a line). The node must notice and
/// rebuild: its file ends up equal to another node's and to the stream, with every line once.
/// A third case leaves the state right and cuts the node's copy of the file instead (what a
/// machine crash can do): the file is rebuilt from the stream the same way.
#[test]
fn a_damaged_stream_state_is_detected_and_rebuilt() {
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Option<Edit>); 3] = [
        (
            "resume + 15",
            Some(|s| {
                let r = s["resume"].as_u64().unwrap();
                s["resume"] = (r + 15).into();
            }),
        ),
        (
            "length + 100",
            Some(|s| {
                let f = &mut s["files"]["log/k.log"];
                let len = f["len"].as_u64().unwrap();
                f["len"] = (len + 100).into();
            }),
        ),
        ("the node's copy 100 bytes short", None),
    ];
    for (name, edit) in cases {
        let server = NatsServer::start();
        let mut a = Mount::with(opts("a", &server, STREAM_TABLE));
        let b = Mount::with(opts("b", &server, STREAM_TABLE));
        a.sh_ok("for i in $(seq 50); do echo \"a $i\" >> log/k.log; done");
        let want_a: String = (1..=50).map(|i| format!("a {i}\n")).collect();
        let state_file = a
            .state
            .join(format!("streams/{}.json", syncfs::tier::kv::bucket_name("log/**")));
        // The state is saved at most once a second: wait until it holds all 50 lines.
        let saved = wait_for(Duration::from_secs(10), || {
            std::fs::read(&state_file)
                .ok()
                .and_then(|d| serde_json::from_slice::<serde_json::Value>(&d).ok())
                .is_some_and(|s| s["files"]["log/k.log"]["len"].as_u64() == Some(want_a.len() as u64))
        });
        assert!(saved, "{name}: the state was saved");
        kill9(&mut a);
        // Other nodes go on: the stream now has messages past the damaged resume point.
        b.sh_ok("for i in $(seq 20); do echo \"b $i\" >> log/k.log; done");
        match edit {
            Some(edit) => {
                let mut state: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
                edit(&mut state);
                std::fs::write(&state_file, serde_json::to_vec(&state).unwrap()).unwrap();
            }
            None => {
                let copy = a.state.join("tree/log/k.log");
                let f = std::fs::OpenOptions::new().write(true).open(&copy).unwrap();
                f.set_len(want_a.len() as u64 - 100).unwrap();
            }
        }

        let from = log_len(&a);
        let out = a.try_mount(&opts("a", &server, STREAM_TABLE));
        assert!(out.status.success(), "{name}: {}", text(&out));
        let want: String = want_a.clone() + &(1..=20).map(|i| format!("b {i}\n")).collect::<String>();
        let (pa, pb) = (a.path("log/k.log"), b.path("log/k.log"));
        assert!(
            wait_for(Duration::from_secs(20), || read(&pb) == want),
            "{name}: node b: {:?}",
            read(&pb)
        );
        let same = wait_for(Duration::from_secs(20), || read(&pa) == want);
        assert!(
            same,
            "{name}: node a's file differs from node b's:\n--- a\n{}\n--- b\n{}\n--- log\n{}",
            read(&pa),
            read(&pb),
            log_since(&a, from)
        );
        assert_eq!(
            stream_content(&server, "log/**"),
            want,
            "{name}: the stream holds the same"
        );
        // It stays right: an append after the rebuild lands once, at the end, on both.
        a.sh_ok("echo after >> log/k.log");
        let after = format!("{want}after\n");
        assert!(
            wait_for(Duration::from_secs(20), || read(&pa) == after && read(&pb) == after),
            "{name}: {:?}",
            read(&pa)
        );
        let log = log_since(&a, from);
        if edit.is_some() {
            assert!(
                log.contains("stream state") && log.contains("damaged"),
                "{name}: the log names the damage:\n{log}"
            );
        } else {
            assert!(
                log.contains("rebuilding a file from its stream"),
                "{name}: the log names the rebuild:\n{log}"
            );
        }
    }
}
