//! Blob-tier benchmark run by scripts/bench.sh: a file written and read through syncfs mounts,
//! in a plain directory, and put and got directly with the async-nats object store, in one
//! run. Prints `name mb_per_s`.
//!
//! Usage:
//!   blobbench raw URL SRC CHUNK [keep]   put SRC into a bench object store (CHUNK-byte chunks),
//!                                        get it back, and delete it unless `keep`
//!   blobbench write SRC DST          copy SRC to DST (1 MiB writes) and close it
//!   blobbench read PATH SIZE         wait until PATH has SIZE bytes, then read it whole
//!   blobbench count URL STORE        how many objects STORE holds

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

fn mbps(bytes: u64, t: Instant) -> f64 {
    bytes as f64 / t.elapsed().as_secs_f64() / 1e6
}

/// What the blob tier does with a closed file and a first read, done directly: one object
/// store put of the file, and a get of it read to the end.
async fn raw(url: &str, src: &Path, chunk: usize, keep: bool) {
    let client = async_nats::connect(url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let store = match js.get_object_store("bench_blobs").await {
        Ok(s) => s,
        Err(_) => js
            .create_object_store(async_nats::jetstream::object_store::Config {
                bucket: "bench_blobs".into(),
                ..Default::default()
            })
            .await
            .unwrap(),
    };
    let size = std::fs::metadata(src).unwrap().len();
    let name = format!("bench-{}", std::process::id());
    let meta = async_nats::jetstream::object_store::ObjectMetadata {
        name: name.clone(),
        chunk_size: Some(chunk),
        ..Default::default()
    };
    let t = Instant::now();
    let mut file = tokio::fs::File::open(src).await.unwrap();
    store.put(meta, &mut file).await.unwrap();
    println!("put_mbps {:.1}", mbps(size, t));
    let t = Instant::now();
    let mut object = store.get(&name).await.unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let n = object.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    assert_eq!(got, size);
    println!("get_mbps {:.1}", mbps(size, t));
    if !keep {
        store.delete(&name).await.unwrap();
    }
}

async fn count(url: &str, bucket: &str) {
    use futures::StreamExt;
    let client = async_nats::connect(url).await.unwrap();
    let store = async_nats::jetstream::new(client).get_object_store(bucket).await.unwrap();
    let mut list = store.list().await.unwrap();
    let mut n = 0;
    while let Some(info) = list.next().await {
        if !info.unwrap().deleted {
            n += 1;
        }
    }
    println!("{n}");
}

fn write(src: &Path, dst: &Path) {
    let size = std::fs::metadata(src).unwrap().len();
    let mut from = File::open(src).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut to = File::create(dst).unwrap();
    loop {
        let n = from.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        to.write_all(&buf[..n]).unwrap();
    }
    // For syncfs the commit (hash, upload, pointer) happens here.
    drop(to);
    println!("write_mbps {:.1}", mbps(size, t));
}

fn read(path: &Path, size: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::fs::metadata(path).map(|m| m.len()).unwrap_or(0) != size {
        assert!(Instant::now() < deadline, "{} never arrived", path.display());
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut f = File::open(path).unwrap();
    let mut got = 0u64;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    assert_eq!(got, size);
    println!("read_mbps {:.1}", mbps(size, t));
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    match args[0].as_str() {
        "raw" => {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let keep = args.get(4).is_some_and(|a| a == "keep");
            rt.block_on(raw(&args[1], Path::new(&args[2]), args[3].parse().unwrap(), keep));
        }
        "count" => {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(count(&args[1], &args[2]));
        }
        "write" => write(Path::new(&args[1]), Path::new(&args[2])),
        "read" => read(Path::new(&args[1]), args[2].parse().unwrap()),
        other => panic!("unknown mode {other}"),
    }
}
