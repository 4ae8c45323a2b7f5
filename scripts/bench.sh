#!/usr/bin/env bash
# Benchmarks syncfs against a plain directory and bindfs (a C FUSE passthrough) in one run and
# writes docs/benchmarks.md. Rounds are interleaved across targets so drift hits all alike;
# each figure is a median. Needs root (mounts, drop_caches).
#
# By default every backing directory lives on a private tmpfs, so the figures measure the
# filesystem layers and not the disk (this machine's ext4 is mounted with `discard`, whose
# TRIMs make file creation swing by 3x between rounds). BENCH_ON=disk uses /var/tmp instead.
#   FILES=2000 ROUNDS=7 MIB=256 SEQ_ROUNDS=3 BENCH_ON=tmpfs scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
. scripts/env.sh
cargo build --release --locked
cargo bench --locked --bench fsbench --no-run >/dev/null 2>&1

FILES=${FILES:-2000}
ROUNDS=${ROUNDS:-7}
MIB=${MIB:-256}
SEQ_ROUNDS=${SEQ_ROUNDS:-3}
SYNCFS="$PWD/target/release/syncfs"
BENCH_ON=${BENCH_ON:-tmpfs}
work=$(mktemp -d /var/tmp/syncfs-bench.XXXXXX)
if [ "$BENCH_ON" = tmpfs ]; then
  mount -t tmpfs -o size=4g syncfs-bench "$work"
fi
results="$work/results.txt"
: > "$results"

cleanup() {
  for m in "$work"/*-mnt; do
    [ -d "$m" ] || continue
    "$SYNCFS" umount "$m" >/dev/null 2>&1 || umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
  if [ "$BENCH_ON" = tmpfs ]; then
    umount "$work" 2>/dev/null || umount -l "$work"
  fi
  rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/native" "$work/bindfs-src" "$work/bindfs-mnt" "$work/bindfs-mt-src" "$work/bindfs-mt-mnt" \
         "$work/syncfs-mnt" "$work/syncfs-nopt-mnt"
bindfs "$work/bindfs-src" "$work/bindfs-mnt"
bindfs --multithreaded "$work/bindfs-mt-src" "$work/bindfs-mt-mnt"
"$SYNCFS" mount "$work/syncfs-mnt" --state "$work/syncfs-state" --node bench >/dev/null
printf 'fuse:\n  passthrough: false\n' > "$work/nopt.yml"
"$SYNCFS" mount "$work/syncfs-nopt-mnt" --state "$work/syncfs-nopt-state" --node bench --config "$work/nopt.yml" >/dev/null
passthrough=$("$SYNCFS" status "$work/syncfs-mnt" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["fuse"]["passthrough"])')

declare -A dirs=(
  [native]="$work/native"
  [bindfs]="$work/bindfs-mnt"
  [bindfs-mt]="$work/bindfs-mt-mnt"
  [syncfs]="$work/syncfs-mnt"
  [syncfs-nopt]="$work/syncfs-nopt-mnt"
)
order=(native bindfs bindfs-mt syncfs syncfs-nopt)

run() { cargo bench --locked --bench fsbench -q -- "$@" 2>/dev/null; }

for ((r = 1; r <= ROUNDS; r++)); do
  for t in "${order[@]}"; do
    run small "${dirs[$t]}" "$FILES" 1 | sed "s/^/$t /" >> "$results"
  done
done
for ((r = 1; r <= SEQ_ROUNDS; r++)); do
  for t in "${order[@]}"; do
    run seq "${dirs[$t]}" "$MIB" 1 drop | sed "s/^/$t /" >> "$results"
  done
done

python3 - "$results" "$FILES" "$ROUNDS" "$MIB" "$SEQ_ROUNDS" "$passthrough" "$BENCH_ON" > "$work/benchmarks.md" <<'PY'
import platform, statistics, subprocess, sys, datetime
path, files, rounds, mib, seq_rounds, passthrough, bench_on = sys.argv[1:]
data = {}
for line in open(path):
    target, name, value = line.split()
    data.setdefault(name, {}).setdefault(target, []).append(float(value))
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown")
mem = next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal"))
cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
targets = ["native", "bindfs", "bindfs-mt", "syncfs", "syncfs-nopt"]
rows = [
    ("create+write 4 KiB+close", "create_write_close_us", "us"),
    ("stat", "stat_us", "us"),
    ("open+read+close", "read_us", "us"),
    ("unlink", "unlink_us", "us"),
    (f"sequential write {mib} MiB + fsync", "seq_write_fsync_mbps", "MB/s"),
    (f"sequential read {mib} MiB" + (" (cold cache)" if bench_on != "tmpfs" else ""), "seq_read_mbps", "MB/s"),
]
print("# Benchmarks\n")
print("Measured by `scripts/bench.sh` (the numbers below are its output, rewritten on every run).\n")
print(f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
print(f"- machine: {cores} vCPU ({cpu}), {int(mem)//1024//1024} GiB RAM, kernel {platform.release()}")
print(f"- command: `FILES={files} ROUNDS={rounds} MIB={mib} SEQ_ROUNDS={seq_rounds} BENCH_ON={bench_on} scripts/bench.sh`")
print(f"- backing storage of every target: {'a private tmpfs (measures the filesystem layers, not the disk)' if bench_on == 'tmpfs' else 'the root ext4 disk (/var/tmp)'}")
print(f"- syncfs: release build, local tier, FUSE passthrough {'on' if passthrough == 'True' else 'OFF (kernel refused)'} in the `syncfs` column, off in `syncfs-nopt`")
print("- bindfs: Debian's bindfs, default options (single-threaded) and `--multithreaded`")
print("- small files: FILES files of 4 KiB per round; each figure is the median over rounds, interleaved across targets")
print()
print("Absolute figures (microseconds per operation, or MB/s):\n")
print("| operation | " + " | ".join(targets) + " |")
print("|---|" + "---:|" * len(targets))
for label, key, unit in rows:
    cells = [f"{statistics.median(data[key][t]):.1f} {unit}" for t in targets]
    print(f"| {label} | " + " | ".join(cells) + " |")
print("\nSpeed relative to the plain directory (1.00 = native; higher is better):\n")
print("| operation | " + " | ".join(targets[1:]) + " |")
print("|---|" + "---:|" * (len(targets) - 1))
for label, key, unit in rows:
    native = statistics.median(data[key]["native"])
    cells = []
    for t in targets[1:]:
        v = statistics.median(data[key][t])
        ratio = native / v if unit == "us" else v / native
        cells.append(f"{ratio:.2f}x")
    print(f"| {label} | " + " | ".join(cells) + " |")
PY
out=docs/benchmarks.md
[ "$BENCH_ON" = tmpfs ] || out=docs/benchmarks-disk.md
cp "$work/benchmarks.md" "$out"
echo "bench.sh: wrote $out"
cat "$out"
