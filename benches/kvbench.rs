//! Fast-tier benchmark run by scripts/bench.sh: the same operations through a syncfs mount and
//! directly with async-nats, in one run. Prints `name p50_us p99_us`.
//!
//! Usage:
//!   kvbench lock-raw URL BUCKET N        exclusive create + update with async-nats
//!   kvbench lock-mount DIR N             open(O_EXCL) + write + close through the mount
//!   kvbench prop-raw URL BUCKET N        put on one connection until a watch on another sees it
//!   kvbench prop-mount DIR_A DIR_B N     write + close on A until a read on B returns it
//!   kvbench fill URL BUCKET PREFIX N     writes N keys (for the memory measurement)

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use futures::StreamExt;

fn report(name: &str, mut us: Vec<f64>) {
    us.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p = |q: f64| us[((us.len() as f64 * q) as usize).min(us.len() - 1)];
    println!("{name} {:.1} {:.1}", p(0.5), p(0.99));
}

fn elapsed_us(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e6
}

async fn kv(url: &str, bucket: &str) -> (async_nats::Client, async_nats::jetstream::kv::Store) {
    let client = async_nats::connect(url).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let store = match js.get_key_value(bucket).await {
        Ok(s) => s,
        Err(_) => js
            .create_key_value(async_nats::jetstream::kv::Config {
                bucket: bucket.into(),
                ..Default::default()
            })
            .await
            .unwrap(),
    };
    (client, store)
}

/// What syncfs does for a claim, done directly: create with expected revision 0, then update
/// against the returned revision, with the same headers.
async fn lock_raw(url: &str, bucket: &str, n: usize) {
    let (client, _store) = kv(url, bucket).await;
    let js = async_nats::jetstream::new(client);
    let run = std::process::id();
    let mut times = Vec::new();
    for i in 0..n {
        let subject = format!("$KV.{bucket}.bench.raw{run}.k{i}");
        let t = Instant::now();
        let msg = PublishMessage::build()
            .payload(bytes::Bytes::new())
            .header("Syncfs-Node", "bench")
            .message_id(format!("c{run}-{i}"))
            .expected_last_subject_sequence(0);
        let rev = js.send_publish(subject.clone(), msg).await.unwrap().await.unwrap().sequence;
        let msg = PublishMessage::build()
            .payload("me".into())
            .header("Syncfs-Node", "bench")
            .message_id(format!("u{run}-{i}"))
            .expected_last_subject_sequence(rev);
        js.send_publish(subject, msg).await.unwrap().await.unwrap();
        times.push(elapsed_us(t));
    }
    report("lock_raw", times);
}

fn lock_mount(dir: &Path, n: usize) {
    let run = std::process::id();
    let mut times = Vec::new();
    for i in 0..n {
        let path = dir.join(format!("mount{run}-k{i}"));
        let t = Instant::now();
        let mut f = OpenOptions::new().write(true).create_new(true).open(&path).unwrap();
        f.write_all(b"me").unwrap();
        drop(f);
        times.push(elapsed_us(t));
    }
    report("lock_mount", times);
}

async fn prop_raw(url: &str, bucket: &str, n: usize) {
    let (_c1, writer) = kv(url, bucket).await;
    let (_c2, reader) = kv(url, bucket).await;
    let key = format!("bench.prop{}", std::process::id());
    let mut watch = reader.watch(&key).await.unwrap();
    let mut times = Vec::new();
    for i in 0..n {
        let value = format!("v{i}");
        let t = Instant::now();
        writer.put(&key, value.clone().into()).await.unwrap();
        loop {
            let entry = watch.next().await.unwrap().unwrap();
            if entry.value == value.as_bytes() {
                break;
            }
        }
        times.push(elapsed_us(t));
    }
    report("propagation_raw", times);
}

fn prop_mount(a: &Path, b: &Path, n: usize) {
    let name = format!("prop{}", std::process::id());
    let (pa, pb) = (a.join(&name), b.join(&name));
    let mut times = Vec::new();
    for i in 0..n {
        let value = format!("v{i}");
        let t = Instant::now();
        std::fs::write(&pa, &value).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read(&pb).ok().as_deref() != Some(value.as_bytes()) {
            assert!(Instant::now() < deadline, "{value} never reached B");
            // Leave the two daemons and the server some CPU: this loop is the reader, not the
            // system under test.
            std::thread::sleep(Duration::from_micros(20));
        }
        times.push(elapsed_us(t));
    }
    report("propagation_mount", times);
}

async fn fill(url: &str, bucket: &str, prefix: &str, n: usize) {
    let (client, _store) = kv(url, bucket).await;
    let js = async_nats::jetstream::new(client);
    let mut acks = Vec::new();
    for i in 0..n {
        let ack = js
            .publish(format!("$KV.{bucket}.{prefix}.k{i:06}"), format!("value {i}").into())
            .await
            .unwrap();
        acks.push(ack);
        if acks.len() >= 512 {
            for ack in acks.drain(..) {
                ack.await.unwrap();
            }
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
    println!("filled {n}");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let n = |i: usize| args[i].parse::<usize>().expect("a count");
    match args[0].as_str() {
        "lock-raw" => rt.block_on(lock_raw(&args[1], &args[2], n(3))),
        "lock-mount" => lock_mount(Path::new(&args[1]), n(2)),
        "prop-raw" => rt.block_on(prop_raw(&args[1], &args[2], n(3))),
        "prop-mount" => prop_mount(Path::new(&args[1]), Path::new(&args[2]), n(3)),
        "fill" => rt.block_on(fill(&args[1], &args[2], &args[3], n(4))),
        other => panic!("unknown mode {other}"),
    }
}
