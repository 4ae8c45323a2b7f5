//! Durable-tier benchmark run by scripts/bench.sh. Prints `name value...` lines.
//!
//! Usage:
//!   gitbench prop DIR_A DIR_B N             write+close on A until B reads it: p50/p99 ms
//!   gitbench raw-prop WORK N                the floor: git2 commit + push from one repository,
//!                                           fetch + read from another, no quiet period: p50/p99 ms
//!   gitbench commits MNT STATE N            N small YAML files written (close) as fast as
//!                                           possible, then until all are committed
//!   gitbench fsync-commits MNT STATE N      N small YAML files written with fsync each (each
//!                                           fsync asks for a commit at once): commits per second
//!   gitbench merge-doc N                    the in-memory merge of one document in which two
//!                                           sides edited N fields between them: ms
//!   gitbench prepare DIR_A N                N issues under durable/bench/ on A (a base)
//!   gitbench edit DIR FIELD N               changes FIELD in each of the N issues
//!   gitbench converge URL REMOTE DIR_A DIR_B N
//!                                           publishes a push notice for REMOTE on NATS (both
//!                                           nodes fetch and push at once), then seconds until
//!                                           the N issues are equal on A and B with both edits

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use syncfs::hlc::Stamp;
use syncfs::merge::{merge_file, Side};
use syncfs::policy::{Consistency, MergeRule};

fn report(name: &str, mut ms: Vec<f64>) {
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p = |q: f64| ms[((ms.len() as f64 * q) as usize).min(ms.len() - 1)];
    println!("{name} {:.1} {:.1}", p(0.5), p(0.99));
}

fn status(mnt: &Path) -> serde_json::Value {
    let path = CString::new(mnt.as_os_str().as_bytes()).unwrap();
    let name = c"user.syncfs.status";
    let mut buf = vec![0u8; 1 << 20];
    // SAFETY: valid C strings and buffer.
    let n = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n > 0, "no status");
    buf.truncate(n as usize);
    serde_json::from_slice(&buf).unwrap()
}

fn wait_committed(mnt: &Path) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while status(mnt)["git"]["uncommitted"].as_u64() != Some(0) {
        assert!(Instant::now() < deadline, "never committed");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn prop(a: &Path, b: &Path, n: usize) {
    let dir = format!("durable/bench-prop-{}", std::process::id());
    std::fs::create_dir_all(a.join(&dir)).unwrap();
    let (pa, pb) = (a.join(&dir).join("p.txt"), b.join(&dir).join("p.txt"));
    let mut times = Vec::new();
    for i in 0..n {
        let value = format!("v{i}\n");
        let t = Instant::now();
        std::fs::write(&pa, &value).unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        while std::fs::read(&pb).ok().as_deref() != Some(value.as_bytes()) {
            assert!(Instant::now() < deadline, "{value} never reached B");
            std::thread::sleep(Duration::from_millis(2));
        }
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    report("prop_ms", times);
}

fn raw_prop(work: &Path, n: usize) {
    let remote = work.join("raw-remote.git");
    git2::Repository::init_bare(&remote).unwrap();
    let a = git2::Repository::init_bare(work.join("raw-a.git")).unwrap();
    let b = git2::Repository::init_bare(work.join("raw-b.git")).unwrap();
    let sig = git2::Signature::now("bench", "bench@syncfs").unwrap();
    let url = remote.display().to_string();
    let mut parent: Option<git2::Oid> = None;
    let mut times = Vec::new();
    for i in 0..n {
        let value = format!("v{i}\n");
        let t = Instant::now();
        let blob = a.blob(value.as_bytes()).unwrap();
        let mut tb = a.treebuilder(None).unwrap();
        tb.insert("p.txt", blob, 0o100644).unwrap();
        let tree = a.find_tree(tb.write().unwrap()).unwrap();
        let parents: Vec<git2::Commit> = parent.iter().map(|p| a.find_commit(*p).unwrap()).collect();
        let refs: Vec<&git2::Commit> = parents.iter().collect();
        let c = a.commit(Some("refs/heads/main"), &sig, &sig, "raw", &tree, &refs).unwrap();
        parent = Some(c);
        a.remote_anonymous(&url).unwrap().push(&["refs/heads/main:refs/heads/main"], None).unwrap();
        b.remote_anonymous(&url).unwrap().fetch(&["+refs/heads/main:refs/remotes/origin/main"], None, None).unwrap();
        let got = b.find_reference("refs/remotes/origin/main").unwrap().peel_to_commit().unwrap();
        let entry = got.tree().unwrap().get_path(Path::new("p.txt")).unwrap();
        assert_eq!(b.find_blob(entry.id()).unwrap().content(), value.as_bytes());
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    report("raw_prop_ms", times);
}

fn issue(i: usize) -> String {
    format!("# bench issue {i}\nid: {i}\ntitle: Issue {i}\nlabels: [bench]\nbody: |\n  Something about {i}.\nupdated_at: 2026-01-01T00:00:00Z\n")
}

fn commit_count(state: &Path) -> u64 {
    let repo = git2::Repository::open_bare(state.join("git")).unwrap();
    let mut walk = repo.revwalk().unwrap();
    walk.push_ref("refs/heads/main").unwrap();
    walk.count() as u64
}

fn commits(mnt: &Path, state: &Path, n: usize, fsync: bool) {
    let dir = mnt.join(format!("durable/bench-commits-{}-{}", if fsync { "fsync" } else { "close" }, std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    wait_committed(mnt);
    let before = commit_count(state);
    let t = Instant::now();
    for i in 0..n {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(dir.join(format!("{i}.yml"))).unwrap();
        f.write_all(issue(i).as_bytes()).unwrap();
        if fsync {
            f.sync_all().unwrap();
        }
    }
    let written = t.elapsed().as_secs_f64();
    wait_committed(mnt);
    let committed = t.elapsed().as_secs_f64();
    let made = commit_count(state) - before;
    let name = if fsync { "fsync_commits" } else { "close_commits" };
    println!("{name} {n} {written:.2} {committed:.2} {made}");
}

fn merge_doc(n: usize) {
    let base: String = (0..n).map(|i| format!("field{i}: value {i}\n")).collect();
    let a: String = (0..n).map(|i| if i % 2 == 0 { format!("field{i}: changed by a {i}\n") } else { format!("field{i}: value {i}\n") }).collect();
    let b: String = (0..n).map(|i| if i % 2 == 1 { format!("field{i}: changed by b {i}\n") } else { format!("field{i}: value {i}\n") }).collect();
    let sa = Stamp { wall_ms: 2, counter: 0, node: "a".into() };
    let sb = Stamp { wall_ms: 1, counter: 0, node: "b".into() };
    let rules: std::collections::BTreeMap<String, MergeRule> = Default::default();
    let mut times = Vec::new();
    for _ in 0..21 {
        let t = Instant::now();
        let out = merge_file(
            Path::new("doc.yml"),
            Consistency::Merge,
            &rules,
            Some(base.as_bytes()),
            Side { content: Some(a.as_bytes()), stamp: &sa, commit: "a" },
            Side { content: Some(b.as_bytes()), stamp: &sb, commit: "b" },
        );
        times.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(out.conflict.is_none());
    }
    report("merge_doc_ms", times);
}

fn prepare(a: &Path, n: usize) {
    let dir = a.join("durable/bench-merge");
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..n {
        std::fs::write(dir.join(format!("{i}.yml")), issue(i)).unwrap();
    }
    wait_committed(a);
    println!("prepared {n}");
}

fn edit(mnt: &Path, field: &str, n: usize) {
    let dir = mnt.join("durable/bench-merge");
    for i in 0..n {
        let path: PathBuf = dir.join(format!("{i}.yml"));
        let text = std::fs::read_to_string(&path).unwrap();
        let text = match field {
            "title" => text.replace(&format!("title: Issue {i}\n"), &format!("title: Issue {i}, retitled\n")),
            _ => text.replace(&format!("  Something about {i}.\n"), &format!("  Something more about {i}.\n")),
        };
        std::fs::write(&path, text).unwrap();
    }
    wait_committed(mnt);
    println!("edited {n}");
}

async fn kick(url: &str, remote: &str) {
    let client = async_nats::connect(url).await.unwrap();
    client.publish(syncfs::tier::git::notice_subject_for(remote), "bench kick".into()).await.unwrap();
    client.flush().await.unwrap();
}

fn converge(url: &str, remote: &str, a: &Path, b: &Path, n: usize) {
    let t = Instant::now();
    tokio::runtime::Runtime::new().unwrap().block_on(kick(url, remote));
    let deadline = t + Duration::from_secs(600);
    let mut pending: Vec<usize> = (0..n).collect();
    while !pending.is_empty() {
        assert!(Instant::now() < deadline, "{} issues never converged", pending.len());
        pending.retain(|i| {
            let rel = format!("durable/bench-merge/{i}.yml");
            let x = std::fs::read_to_string(a.join(&rel)).unwrap_or_default();
            let y = std::fs::read_to_string(b.join(&rel)).unwrap_or_default();
            !(x == y && x.contains("retitled") && x.contains("Something more"))
        });
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("converge {n} {:.2}", t.elapsed().as_secs_f64());
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let n = |i: usize| args[i].parse::<usize>().expect("a count");
    match args[0].as_str() {
        "prop" => prop(Path::new(&args[1]), Path::new(&args[2]), n(3)),
        "raw-prop" => raw_prop(Path::new(&args[1]), n(2)),
        "commits" => commits(Path::new(&args[1]), Path::new(&args[2]), n(3), false),
        "fsync-commits" => commits(Path::new(&args[1]), Path::new(&args[2]), n(3), true),
        "merge-doc" => merge_doc(n(1)),
        "prepare" => prepare(Path::new(&args[1]), n(2)),
        "edit" => edit(Path::new(&args[1]), &args[2], n(3)),
        "converge" => converge(&args[1], &args[2], Path::new(&args[3]), Path::new(&args[4]), n(5)),
        other => panic!("unknown mode {other}"),
    }
}
