//! Append-tier benchmark run by scripts/bench.sh: appends through syncfs mounts and the same
//! publishes done directly with async-nats, in one run. Prints `name p50_us p99_us ops_per_s`,
//! or `name mb_per_s` for bulk appends.
//!
//! Usage:
//!   streambench append-raw URL N           publish + ack, N times, on one subject
//!   streambench append-mount DIR N         open(O_APPEND) + write a line + close, N times
//!   streambench prop-raw URL N             publish on one connection until a consumer on another gets it
//!   streambench prop-mount DIR_A DIR_B N   append on A until B's file holds the line
//!   streambench bulk-mount DIR MIB         one append of MIB MiB (split into parts) + close

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{push, DeliverPolicy};
use async_nats::jetstream::stream::Config;
use futures::StreamExt;

fn report(name: &str, mut us: Vec<f64>, total: Duration) {
    let n = us.len();
    us.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p = |q: f64| us[((n as f64 * q) as usize).min(n - 1)];
    println!("{name} {:.1} {:.1} {:.0}", p(0.5), p(0.99), n as f64 / total.as_secs_f64());
}

fn elapsed_us(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e6
}

async fn stream(url: &str) -> (async_nats::Client, async_nats::jetstream::Context) {
    let client = async_nats::connect(url).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    js.get_or_create_stream(Config {
        name: "bench_append".into(),
        subjects: vec!["bench.append.>".into()],
        allow_rollup: true,
        ..Default::default()
    })
    .await
    .unwrap();
    (client, js)
}

/// What syncfs does for one append, done directly: a publish with the same headers, awaiting
/// its acknowledgement.
async fn append_raw(url: &str, n: usize) {
    let (_client, js) = stream(url).await;
    let run = std::process::id();
    let subject = format!("bench.append.raw{run}");
    let mut times = Vec::new();
    let started = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        let msg = async_nats::jetstream::message::PublishMessage::build()
            .payload(format!("line {i} of the raw append benchmark\n").into())
            .header("Syncfs-Node", "bench")
            .message_id(format!("r{run}-{i}"));
        js.send_publish(subject.clone(), msg).await.unwrap().await.unwrap();
        times.push(elapsed_us(t));
    }
    report("append_raw", times, started.elapsed());
}

fn append_line(path: &Path, line: &str) {
    let mut f = OpenOptions::new().append(true).create(true).open(path).unwrap();
    f.write_all(line.as_bytes()).unwrap();
}

fn append_mount(dir: &Path, n: usize) {
    let path = dir.join(format!("bench{}.log", std::process::id()));
    let mut times = Vec::new();
    let started = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        append_line(&path, &format!("line {i} of the mount append benchmark\n"));
        times.push(elapsed_us(t));
    }
    report("append_mount", times, started.elapsed());
}

async fn prop_raw(url: &str, n: usize) {
    let (_c1, writer) = stream(url).await;
    let (c2, reader) = stream(url).await;
    let subject = format!("bench.append.prop{}", std::process::id());
    let consumer = reader
        .get_stream("bench_append")
        .await
        .unwrap()
        .create_consumer(push::OrderedConfig {
            deliver_subject: c2.new_inbox(),
            filter_subject: subject.clone(),
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut times = Vec::new();
    let started = Instant::now();
    for i in 0..n {
        let line = format!("p{i}\n");
        let t = Instant::now();
        writer.publish(subject.clone(), line.clone().into()).await.unwrap().await.unwrap();
        loop {
            let m = messages.next().await.unwrap().unwrap();
            if m.payload == line.as_bytes() {
                break;
            }
        }
        times.push(elapsed_us(t));
    }
    report("propagation_raw", times, started.elapsed());
}

fn prop_mount(a: &Path, b: &Path, n: usize) {
    let name = format!("prop{}.log", std::process::id());
    let (pa, pb) = (a.join(&name), b.join(&name));
    let mut times = Vec::new();
    let mut len = 0u64;
    let started = Instant::now();
    for i in 0..n {
        let line = format!("p{i}\n");
        len += line.len() as u64;
        let t = Instant::now();
        append_line(&pa, &line);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::metadata(&pb).map(|m| m.len()).unwrap_or(0) < len {
            assert!(Instant::now() < deadline, "line {i} never reached B");
            // Leave the daemons and the server some CPU: this loop is the reader.
            std::thread::sleep(Duration::from_micros(20));
        }
        times.push(elapsed_us(t));
    }
    report("propagation_mount", times, started.elapsed());
}

fn bulk_mount(dir: &Path, mib: usize) {
    let path = dir.join(format!("bulk{}.log", std::process::id()));
    let chunk = vec![b'x'; 1 << 20];
    let t = Instant::now();
    let mut f = OpenOptions::new().append(true).create(true).open(&path).unwrap();
    for _ in 0..mib {
        f.write_all(&chunk).unwrap();
    }
    drop(f);
    println!("bulk_append_mbps {:.1}", (mib << 20) as f64 / t.elapsed().as_secs_f64() / 1e6);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let n = |i: usize| args[i].parse::<usize>().expect("a count");
    match args[0].as_str() {
        "append-raw" => rt.block_on(append_raw(&args[1], n(2))),
        "append-mount" => append_mount(Path::new(&args[1]), n(2)),
        "prop-raw" => rt.block_on(prop_raw(&args[1], n(2))),
        "prop-mount" => prop_mount(Path::new(&args[1]), Path::new(&args[2]), n(3)),
        "bulk-mount" => bulk_mount(Path::new(&args[1]), n(2)),
        other => panic!("unknown mode {other}"),
    }
}
