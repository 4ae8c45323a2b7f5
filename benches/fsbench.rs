//! Filesystem micro-benchmark run by scripts/bench.sh against a plain directory, bindfs and
//! syncfs in the same run. Prints `name value` lines: microseconds per operation for the
//! small-file phases, MB/s for the sequential ones; each the median of several rounds.
//!
//! Usage: fsbench small DIR FILES ROUNDS | fsbench seq DIR MIB ROUNDS [DROP_CACHES]

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn small(dir: &Path, files: usize, rounds: usize) {
    let data = vec![0x5au8; 4096];
    let mut phases: [(&str, Vec<f64>); 4] = [
        ("create_write_close_us", vec![]),
        ("stat_us", vec![]),
        ("read_us", vec![]),
        ("unlink_us", vec![]),
    ];
    let mut buf = Vec::with_capacity(4096);
    for round in 0..rounds {
        let d = dir.join(format!("small-{round}"));
        fs::create_dir_all(&d).unwrap();
        let names: Vec<_> = (0..files).map(|i| d.join(format!("f{i}"))).collect();
        let t = Instant::now();
        for n in &names {
            let mut f = File::create(n).unwrap();
            f.write_all(&data).unwrap();
        }
        phases[0].1.push(t.elapsed().as_secs_f64() * 1e6 / files as f64);
        let t = Instant::now();
        for n in &names {
            assert_eq!(fs::metadata(n).unwrap().len(), 4096);
        }
        phases[1].1.push(t.elapsed().as_secs_f64() * 1e6 / files as f64);
        let t = Instant::now();
        for n in &names {
            buf.clear();
            File::open(n).unwrap().read_to_end(&mut buf).unwrap();
        }
        phases[2].1.push(t.elapsed().as_secs_f64() * 1e6 / files as f64);
        let t = Instant::now();
        for n in &names {
            fs::remove_file(n).unwrap();
        }
        phases[3].1.push(t.elapsed().as_secs_f64() * 1e6 / files as f64);
        fs::remove_dir(&d).unwrap();
    }
    for (name, values) in phases {
        println!("{name} {:.2}", median(values));
    }
}

fn drop_caches() {
    // Needs root; without it the read phase measures the page cache, which the caller notes.
    let _ = std::process::Command::new("sync").status();
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

fn seq(dir: &Path, mib: usize, rounds: usize, drop_cache: bool) {
    let block = vec![0xa5u8; 1 << 20];
    let mut writes = vec![];
    let mut reads = vec![];
    let mut buf = vec![0u8; 1 << 20];
    for round in 0..rounds {
        let path = dir.join(format!("seq-{round}.bin"));
        let t = Instant::now();
        let mut f = File::create(&path).unwrap();
        for _ in 0..mib {
            f.write_all(&block).unwrap();
        }
        f.sync_all().unwrap();
        drop(f);
        writes.push(mib as f64 / t.elapsed().as_secs_f64());
        if drop_cache {
            drop_caches();
        }
        let t = Instant::now();
        let mut f = File::open(&path).unwrap();
        let mut total = 0;
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            total += n;
        }
        assert_eq!(total, mib << 20);
        reads.push(mib as f64 / t.elapsed().as_secs_f64());
        fs::remove_file(&path).unwrap();
    }
    println!("seq_write_fsync_mbps {:.1}", median(writes));
    println!("seq_read_mbps {:.1}", median(reads));
}


fn main() {
    // `cargo bench` appends `--bench`; ignore flags.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let usage = "usage: fsbench small DIR FILES ROUNDS | fsbench seq DIR MIB ROUNDS [drop]";
    let mode = args.first().expect(usage);
    let dir = Path::new(args.get(1).expect(usage));
    let n: usize = args.get(2).expect(usage).parse().expect(usage);
    let rounds: usize = args.get(3).expect(usage).parse().expect(usage);
    match mode.as_str() {
        "small" => small(dir, n, rounds),
        "seq" => seq(dir, n, rounds, args.get(4).map(String::as_str) == Some("drop")),
        _ => panic!("{usage}"),
    }
}
