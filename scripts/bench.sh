#!/usr/bin/env bash
# Benchmarks syncfs against a plain directory and bindfs (a C FUSE passthrough) in one run and
# writes docs/benchmarks.md. Rounds are interleaved across targets so drift hits all alike;
# each figure is a median. Needs root (mounts, drop_caches).
#
# By default every backing directory lives on a private tmpfs, so the figures measure the
# filesystem layers and not the disk (this machine's ext4 is mounted with `discard`, whose
# TRIMs make file creation swing by 3x between rounds). BENCH_ON=disk uses /var/tmp instead.
#   FILES=2000 ROUNDS=7 MIB=256 SEQ_ROUNDS=3 BENCH_ON=tmpfs scripts/bench.sh
# BASELINE=/path/to/an/older/syncfs also measures the KV claim and propagation with that build,
# in the same run and on the same server, to show what a change cost.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
. scripts/env.sh
cargo build --release --locked
cargo bench --locked --bench fsbench --no-run >/dev/null 2>&1
cargo bench --locked --bench kvbench --no-run >/dev/null 2>&1
cargo bench --locked --bench gitbench --no-run >/dev/null 2>&1
cargo bench --locked --bench streambench --no-run >/dev/null 2>&1
cargo bench --locked --bench blobbench --no-run >/dev/null 2>&1

FILES=${FILES:-2000}
LOCKS=${LOCKS:-1000}
PROPS=${PROPS:-500}
KEYS=${KEYS:-100000}
GITPROPS=${GITPROPS:-30}
GITPROPS_POLL=${GITPROPS_POLL:-10}
GITFILES=${GITFILES:-1000}
GITFSYNC=${GITFSYNC:-200}
ROUNDS=${ROUNDS:-7}
MIB=${MIB:-256}
SEQ_ROUNDS=${SEQ_ROUNDS:-3}
APPENDS=${APPENDS:-1000}
BLOB_MIB=${BLOB_MIB:-256}
BLOB_ROUNDS=${BLOB_ROUNDS:-5}
LARGE_MIB=${LARGE_MIB:-1024}
SYNCFS="$PWD/target/release/syncfs"
BENCH_ON=${BENCH_ON:-tmpfs}
work=$(mktemp -d /var/tmp/syncfs-bench.XXXXXX)
if [ "$BENCH_ON" = tmpfs ]; then
  # Room for the blob rounds: each file lives in a source, the NATS store and two caches.
  mount -t tmpfs -o size=10g syncfs-bench "$work"
  # This VM backs guest memory lazily: the first write of a page costs a host fault, which
  # made tmpfs writes 5x slower once the blob rounds reached memory never used before. Touch
  # it all once, so every target writes into memory the guest already has.
  head -c 9900M /dev/zero > "$work/warm" 2>/dev/null || true
  rm -f "$work/warm"
fi
results="$work/results.txt"
errors="$work/stderr.log"
kvresults="$work/kv.txt"
gitresults="$work/git.txt"
streamresults="$work/stream.txt"
blobresults="$work/blob.txt"
: > "$streamresults"
: > "$blobresults"
: > "$results"
: > "$kvresults"
: > "$gitresults"

cleanup() {
  status=${1:-$?}
  if [ "$status" -ne 0 ] && [ -s "$errors" ]; then
    echo "bench.sh: failed ($status); the benchmark programs said:" >&2
    tail -n 30 "$errors" >&2
  fi
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
# The file benchmarks use a local-only table: they measure the filesystem, not NATS.
printf 'policies:\n  - pattern: "**"\n    tier: local\n' > "$work/local.yml"
printf 'policies_seed: %s\n' "$work/local.yml" > "$work/pt.yml"
printf 'policies_seed: %s\nfuse:\n  passthrough: false\n' "$work/local.yml" > "$work/nopt.yml"
"$SYNCFS" mount "$work/syncfs-mnt" --state "$work/syncfs-state" --node bench --config "$work/pt.yml" >/dev/null
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

run() { cargo bench --locked --bench fsbench -q -- "$@" 2>>"$errors"; }

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

# The fast tier: one nats-server of the bench's own, two mounts on it, and the same
# operations done directly with async-nats in the same run.
kvrun() { cargo bench --locked --bench kvbench -q -- "$@" 2>>"$errors"; }
nats_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
nats-server -js -a 127.0.0.1 -p "$nats_port" -sd "$work/nats" -l "$work/nats.log" &
nats_pid=$!
trap 's=$?; kill $nats_pid 2>/dev/null || true; cleanup $s' EXIT
sleep 0.5
url="nats://127.0.0.1:$nats_port"
mkdir -p "$work/kv-a-mnt" "$work/kv-b-mnt" "$work/kv-c-mnt"
"$SYNCFS" mount "$work/kv-a-mnt" --state "$work/kv-a" --node a --nats "$url" >/dev/null
"$SYNCFS" mount "$work/kv-b-mnt" --state "$work/kv-b" --node b --nats "$url" >/dev/null
kvrun lock-raw "$url" bench_raw "$LOCKS" >> "$kvresults"
kvrun lock-mount "$work/kv-a-mnt/fast/claims" "$LOCKS" >> "$kvresults"
kvrun prop-raw "$url" bench_raw "$PROPS" >> "$kvresults"
kvrun prop-mount "$work/kv-a-mnt/fast/casual" "$work/kv-b-mnt/fast/casual" "$PROPS" >> "$kvresults"
if [ -n "${BASELINE:-}" ]; then
  # The same two measurements with the older build, then again with this one, so drift over
  # the run shows; each line is tagged with its build.
  mkdir -p "$work/kv-a0-mnt" "$work/kv-b0-mnt"
  "$BASELINE" mount "$work/kv-a0-mnt" --state "$work/kv-a0" --node a0 --nats "$url" >/dev/null
  "$BASELINE" mount "$work/kv-b0-mnt" --state "$work/kv-b0" --node b0 --nats "$url" >/dev/null
  for build in base new; do
    if [ "$build" = base ]; then a="$work/kv-a0-mnt"; b="$work/kv-b0-mnt"; else a="$work/kv-a-mnt"; b="$work/kv-b-mnt"; fi
    kvrun lock-mount "$a/fast/claims" "$LOCKS" | sed "s/^lock_mount /lock_mount_$build /" >> "$kvresults"
    kvrun prop-mount "$a/fast/casual" "$b/fast/casual" "$PROPS" | sed "s/^propagation_mount /propagation_mount_$build /" >> "$kvresults"
  done
  "$BASELINE" umount "$work/kv-a0-mnt" >/dev/null
  "$BASELINE" umount "$work/kv-b0-mnt" >/dev/null
fi
# What the embedded server's `sync_interval: always` costs (each message fsync'ed before its
# acknowledgement): the same raw claims on a second server configured that way, on the same
# disk as the bench's other stores (/var/tmp).
sync_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$work/nats-sync"
printf 'jetstream {\n  store_dir: "%s"\n  sync_interval: always\n}\n' "$work/nats-sync" > "$work/nats-sync.conf"
nats-server -c "$work/nats-sync.conf" -js -a 127.0.0.1 -p "$sync_port" -l "$work/nats-sync.log" &
sync_pid=$!
sleep 0.5
for build in default always; do
  if [ "$build" = default ]; then u="$url"; else u="nats://127.0.0.1:$sync_port"; fi
  kvrun lock-raw "$u" bench_sync "$LOCKS" | sed "s/^lock_raw /lock_raw_sync_$build /" >> "$kvresults"
done
kill "$sync_pid" 2>/dev/null || true
# Memory of a mount holding KEYS keys: written directly, then read by a fresh mount.
casual=$(python3 - <<'PYB'
h = 0x811c9dc5
for b in b"fast/status/**":
    h = ((h ^ b) * 0x01000193) & 0xffffffff
print(f"syncfs_fast_status_{h:08x}")
PYB
)
kvrun fill "$url" "$casual" fast.status "$KEYS" >/dev/null
started=$(date +%s.%N)
"$SYNCFS" mount "$work/kv-c-mnt" --state "$work/kv-c" --node c --nats "$url" >/dev/null
mounted=$(date +%s.%N)
c_pid=$("$SYNCFS" status "$work/kv-c-mnt" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])')
c_keys=$("$SYNCFS" status "$work/kv-c-mnt" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["nats"]["keys"])')
echo "memory $c_keys $(awk '/VmRSS/ {print $2}' /proc/$c_pid/status) $(awk '/VmHWM/ {print $2}' /proc/$c_pid/status) $(python3 -c "print(round($mounted - $started, 2))")" >> "$kvresults"

# The append tier: the two mounts above (the default table's fast/messages/** is nats-stream),
# and the same publishes done directly with async-nats.
streamrun() { cargo bench --locked --bench streambench -q -- "$@" 2>>"$errors"; }
streamrun append-raw "$url" "$APPENDS" >> "$streamresults"
streamrun append-mount "$work/kv-a-mnt/fast/messages" "$APPENDS" >> "$streamresults"
streamrun prop-raw "$url" "$PROPS" >> "$streamresults"
streamrun prop-mount "$work/kv-a-mnt/fast/messages" "$work/kv-b-mnt/fast/messages" "$PROPS" >> "$streamresults"
streamrun bulk-mount "$work/kv-a-mnt/fast/messages" 64 >> "$streamresults"

# The blob tier: two fresh mounts on the bench's server; each round a new random file is put
# and got directly, written and read in a plain directory, written on A and read on B twice
# (the first read fetches it, the second is served from B's cache). Every round removes what
# it stored (syncfs's object goes by its garbage collection, run every second here), so that
# each round starts from the same memory: on this VM, memory the guest has not used yet costs
# a host fault per page, and a store that grows round after round made late rounds 3x slower.
# Then one LARGE_MIB file, with the daemons' peak memory.
blobrun() { cargo bench --locked --bench blobbench -q -- "$@" 2>>"$errors"; }
mkdir -p "$work/blob-a-mnt" "$work/blob-b-mnt" "$work/blob-native"
printf 'nats:\n  object_store:\n    gc_interval_ms: 1000\n    gc_grace_ms: 1000\ncache:\n  max_bytes: %s\n' \
  $(( (LARGE_MIB + 2 * BLOB_MIB) << 20 )) > "$work/blob.yml"
"$SYNCFS" mount "$work/blob-a-mnt" --state "$work/blob-a" --node ba --nats "$url" --config "$work/blob.yml" >/dev/null
"$SYNCFS" mount "$work/blob-b-mnt" --state "$work/blob-b" --node bb --nats "$url" --config "$work/blob.yml" >/dev/null
objects() { cargo bench --locked --bench blobbench -q -- count "$url" syncfs_blobs 2>>"$errors"; }
for ((r = 1; r <= BLOB_ROUNDS; r++)); do
  head -c "${BLOB_MIB}M" /dev/urandom > "$work/blob-src"
  size=$(stat -c %s "$work/blob-src")
  blobrun raw "$url" "$work/blob-src" 1040384 | sed 's/^/raw /' >> "$blobresults"
  blobrun write "$work/blob-src" "$work/blob-native/f$r" | sed 's/^/native /' >> "$blobresults"
  blobrun read "$work/blob-native/f$r" "$size" | sed 's/^/native /' >> "$blobresults"
  rm -f "$work/blob-native/f$r"
  blobrun write "$work/blob-src" "$work/blob-a-mnt/blobs/f$r" | sed 's/^/syncfs /' >> "$blobresults"
  blobrun read "$work/blob-b-mnt/blobs/f$r" "$size" | sed 's/^/fetch /' >> "$blobresults"
  blobrun read "$work/blob-b-mnt/blobs/f$r" "$size" | sed 's/^/cached /' >> "$blobresults"
  rm -f "$work/blob-a-mnt/blobs/f$r"
  for _ in $(seq 100); do [ "$(objects)" = 0 ] && break; sleep 0.1; done
done
gc_deleted=$("$SYNCFS" status "$work/blob-a-mnt" --json | python3 -c 'import json,sys; g=json.load(sys.stdin)["blobs"]["gc"]; print(g["deleted"])')
head -c "${LARGE_MIB}M" /dev/urandom > "$work/blob-src"
size=$(stat -c %s "$work/blob-src")
large_w=$(blobrun write "$work/blob-src" "$work/blob-a-mnt/blobs/large" | awk '{print $2}')
large_r=$(blobrun read "$work/blob-b-mnt/blobs/large" "$size" | awk '{print $2}')
hwm() { awk '/VmHWM/ {print $2}' "/proc/$("$SYNCFS" status "$1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])')/status"; }
ok=$([ "$(sha256sum < "$work/blob-src")" = "$(sha256sum < "$work/blob-b-mnt/blobs/large")" ] && echo same || echo DIFFERENT)
echo "large $LARGE_MIB $large_w $large_r $(hwm "$work/blob-a-mnt") $(hwm "$work/blob-b-mnt") $ok $gc_deleted" >> "$blobresults"
rm -f "$work/blob-src"

# The durable tier, with default timings (quiet 1.5 s, fetch interval 10 s): two mounts on the
# bench's NATS server (push notices) and a bare remote; two more with their own embedded NATS
# servers on another remote (no notices reach them: they fetch on the interval); the floor is
# the same commit, push and fetch done directly with git2.
gitrun() { cargo bench --locked --bench gitbench -q -- "$@" 2>>"$errors"; }
git init --quiet --bare -b main "$work/remote.git"
git init --quiet --bare -b main "$work/remote-poll.git"
mkdir -p "$work/git-a-mnt" "$work/git-b-mnt" "$work/git-c-mnt" "$work/git-d-mnt"
"$SYNCFS" mount "$work/git-a-mnt" --state "$work/git-a" --node ga --nats "$url" --git-remote "$work/remote.git" >/dev/null
"$SYNCFS" mount "$work/git-b-mnt" --state "$work/git-b" --node gb --nats "$url" --git-remote "$work/remote.git" >/dev/null
"$SYNCFS" mount "$work/git-c-mnt" --state "$work/git-c" --node gc --git-remote "$work/remote-poll.git" >/dev/null
"$SYNCFS" mount "$work/git-d-mnt" --state "$work/git-d" --node gd --git-remote "$work/remote-poll.git" >/dev/null
gitrun prop "$work/git-a-mnt" "$work/git-b-mnt" "$GITPROPS" | sed 's/^prop_ms/prop_notice_ms/' >> "$gitresults"
gitrun prop "$work/git-c-mnt" "$work/git-d-mnt" "$GITPROPS_POLL" | sed 's/^prop_ms/prop_poll_ms/' >> "$gitresults"
gitrun raw-prop "$work" "$GITPROPS" >> "$gitresults"
gitrun commits "$work/git-a-mnt" "$work/git-a" "$GITFILES" >> "$gitresults"
gitrun fsync-commits "$work/git-a-mnt" "$work/git-a" "$GITFSYNC" >> "$gitresults"
gitrun merge-doc 1000 >> "$gitresults"
# 1000 issues edited on both nodes while the remote is away (A retitles, B rewrites the body),
# then the remote comes back and a notice makes both try at once: seconds until they agree.
gitrun prepare "$work/git-a-mnt" "$GITFILES" >/dev/null
while [ "$(ls "$work/git-b-mnt/durable/bench-merge" 2>/dev/null | wc -l)" -lt "$GITFILES" ]; do sleep 0.2; done
sleep 3
mv "$work/remote.git" "$work/remote.away"
gitrun edit "$work/git-a-mnt" title "$GITFILES" >/dev/null
gitrun edit "$work/git-b-mnt" body "$GITFILES" >/dev/null
mv "$work/remote.away" "$work/remote.git"
gitrun converge "$url" "$work/remote.git" "$work/git-a-mnt" "$work/git-b-mnt" "$GITFILES" >> "$gitresults"

python3 - "$results" "$FILES" "$ROUNDS" "$MIB" "$SEQ_ROUNDS" "$passthrough" "$BENCH_ON" "$kvresults" "$LOCKS" "$PROPS" "$gitresults" "$streamresults" "$APPENDS" "$blobresults" "$BLOB_MIB" "$BLOB_ROUNDS" > "$work/benchmarks.md" <<'PY'
import datetime, os, platform, statistics, subprocess, sys
path, files, rounds, mib, seq_rounds, passthrough, bench_on, kvpath, locks, props, gitpath, streampath, appends, blobpath, blob_mib, blob_rounds = sys.argv[1:]
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
print("## Measured\n")
print("By `scripts/bench.sh`: this part is its output, rewritten on every run.\n")
print(f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
print(f"- machine: {cores} vCPU ({cpu}), {int(mem)//1024//1024} GiB RAM, kernel {platform.release()}")
baseline = os.environ.get("BASELINE")
baseline = f"BASELINE={baseline} " if baseline else ""
print(f"- command: `{baseline}FILES={files} ROUNDS={rounds} MIB={mib} SEQ_ROUNDS={seq_rounds} APPENDS={appends} BLOB_MIB={blob_mib} BLOB_ROUNDS={blob_rounds} BENCH_ON={bench_on} scripts/bench.sh`")
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

kv = {}
memory = None
for line in open(kvpath):
    parts = line.split()
    if parts[0] == "memory":
        memory = parts[1:]
    elif len(parts) == 3:
        kv[parts[0]] = (float(parts[1]), float(parts[2]))
print("\n### Fast tier (NATS KV)\n")
print("One nats-server 2.10 on loopback (store on the same tmpfs), two syncfs mounts on it, and")
print("the same operations done directly with async-nats, all in this run (`benches/kvbench.rs`).\n")
print("| operation | through the mount p50 / p99 | async-nats directly p50 / p99 | ratio (p50) |")
print("|---|---:|---:|---:|")
for label, mount, raw in [
    (f"claim: open(O_EXCL) + write + close, {locks} times (raw: create + update)", "lock_mount", "lock_raw"),
    (f"propagation A -> B: write+close on A until B reads it, {props} times (raw: put -> watch)", "propagation_mount", "propagation_raw"),
]:
    m, r = kv[mount], kv[raw]
    print(f"| {label} | {m[0]:.0f} / {m[1]:.0f} us | {r[0]:.0f} / {r[1]:.0f} us | {m[0] / r[0]:.2f}x |")
if "lock_mount_base" in kv:
    print("\nThe same claims and propagation with an older build (`BASELINE`), on the same server in")
    print("this run, after this build's rows above; this build was measured once more after it.\n")
    print("| operation | older build p50 / p99 | this build p50 / p99 | ratio (p50) |")
    print("|---|---:|---:|---:|")
    for label, key in [("claim", "lock_mount"), ("propagation A -> B", "propagation_mount")]:
        o, n = kv[key + "_base"], kv[key + "_new"]
        print(f"| {label} | {o[0]:.0f} / {o[1]:.0f} us | {n[0]:.0f} / {n[1]:.0f} us | {n[0] / o[0]:.2f}x |")
if "lock_raw_sync_always" in kv:
    d, a = kv["lock_raw_sync_default"], kv["lock_raw_sync_always"]
    print(f"\nThe embedded server runs with `sync_interval: always`. Its cost on this machine's /var/tmp, raw claims")
    print(f"(create + update) on a server with the default (fsync every 2 min) vs `always`: p50 {d[0]:.0f} vs {a[0]:.0f} us,")
    print(f"p99 {d[1]:.0f} vs {a[1]:.0f} us ({a[0] / d[0]:.2f}x at p50).")
if memory:
    keys, rss, hwm, secs = memory
    print(f"\nA fresh mount reading a bucket of {int(keys):,} keys: ready in {secs} s, daemon RSS {int(rss)//1024} MiB (peak {int(hwm)//1024} MiB).")

st = {}
for line in open(streampath):
    parts = line.split()
    st[parts[0]] = [float(x) for x in parts[1:]]
print("\n### Append tier (NATS streams)\n")
print("The same two mounts (`fast/messages/**`), and the same publishes done directly with")
print("async-nats on the same server, in this run (`benches/streambench.rs`).\n")
print("| operation | through the mount p50 / p99 | async-nats directly p50 / p99 | ratio (p50) |")
print("|---|---:|---:|---:|")
for label, mount, raw in [
    (f"append: open(O_APPEND) + write a line + close, {appends} times (raw: publish + ack)", "append_mount", "append_raw"),
    (f"visibility A -> B: append on A until B's file holds it, {props} times (raw: publish -> consumer)", "propagation_mount", "propagation_raw"),
]:
    m, r = st[mount], st[raw]
    print(f"| {label} | {m[0]:.0f} / {m[1]:.0f} us | {r[0]:.0f} / {r[1]:.0f} us | {m[0] / r[0]:.2f}x |")
m, r = st["append_mount"], st["append_raw"]
print(f"\nAppend throughput, one writer: {m[2]:.0f} appends/s through the mount, {r[2]:.0f} publishes/s directly.")
print(f"One 64 MiB append (split into payload-sized parts, published one after another): {st['bulk_append_mbps'][0]:.0f} MB/s until close returned.")

bl = {}
large = None
for line in open(blobpath):
    parts = line.split()
    if parts[0] == "large":
        large = parts[1:]
    else:
        bl.setdefault(parts[1], {}).setdefault(parts[0], []).append(float(parts[2]))
med = lambda k, t: statistics.median(bl[k][t])
print("\n### Blob tier (NATS object store)\n")
print(f"A new random {blob_mib} MiB file per round, {blob_rounds} rounds, medians (`benches/blobbench.rs`):")
print("written with 1 MiB writes and closed (for syncfs: hashed, uploaded, pointer published), then")
print("read whole with 1 MiB reads; on syncfs, written on node A and read on node B, whose first")
print("read fetches and verifies the object and whose second read is served from its cache. The")
print("raw figures are one object store put of the file (1 MiB - 8 KiB chunks, as syncfs) and one get")
print("read to the end, with async-nats on the same server. Each round removes what it stored")
print("(syncfs's objects by its garbage collection), so every round starts alike.\n")
print("| operation | syncfs | async-nats object store | plain directory | syncfs / object store |")
print("|---|---:|---:|---:|---:|")
print(f"| write + close | {med('write_mbps', 'syncfs'):.0f} MB/s | {med('put_mbps', 'raw'):.0f} MB/s (put) | {med('write_mbps', 'native'):.0f} MB/s | {med('write_mbps', 'syncfs') / med('put_mbps', 'raw'):.2f}x |")
print(f"| first read on another node | {med('read_mbps', 'fetch'):.0f} MB/s | {med('get_mbps', 'raw'):.0f} MB/s (get) | {med('read_mbps', 'native'):.0f} MB/s | {med('read_mbps', 'fetch') / med('get_mbps', 'raw'):.2f}x |")
print(f"| second read (cache) | {med('read_mbps', 'cached'):.0f} MB/s | | {med('read_mbps', 'native'):.0f} MB/s | |")
rounds = lambda k, t: " ".join(f"{v:.0f}" for v in bl[k][t])
print(f"\nEach round, in order (MB/s): syncfs write {rounds('write_mbps', 'syncfs')}; put {rounds('put_mbps', 'raw')}; first read {rounds('read_mbps', 'fetch')}; get {rounds('get_mbps', 'raw')}.")
if large:
    mib_l, w, r, hwa, hwb, ok, gcd = large
    print(f"\nOne {mib_l} MiB file: written on A at {float(w):.0f} MB/s, read on B at {float(r):.0f} MB/s ({ok} bytes); peak RSS of the daemons over the whole blob run: A {int(hwa)//1024} MiB, B {int(hwb)//1024} MiB. The rounds' objects were removed by A's garbage collection ({gcd} deleted).")

g = {}
for line in open(gitpath):
    parts = line.split()
    g[parts[0]] = parts[1:]
print("\n### Durable tier (git)\n")
print("Default timings (commit after 1.5 s of quiet, fetch every 10 s without a notice), a bare")
print("remote on the same tmpfs, NATS notices through the bench's server (`benches/gitbench.rs`).\n")
print("| measurement | result |")
print("|---|---:|")
pn, pp, raw = g["prop_notice_ms"], g["prop_poll_ms"], g["raw_prop_ms"]
print(f"| propagation A -> B with the NATS notice: write+close on A until B reads it, p50 / p99 | {float(pn[0]):.0f} / {float(pn[1]):.0f} ms |")
print(f"| propagation A -> B without notices (fetch interval), p50 / p99 | {float(pp[0]):.0f} / {float(pp[1]):.0f} ms |")
print(f"| floor: git2 commit + push + fetch + read, no quiet period, p50 / p99 | {float(raw[0]):.1f} / {float(raw[1]):.1f} ms |")
n, written, committed, made = g["close_commits"]
print(f"| {n} small YAML files written (create+write+close each) | written in {float(written):.2f} s ({int(n)/float(written):.0f} files/s); all committed {float(committed):.2f} s after the first, in {made} commit(s) |")
n, written, committed, made = g["fsync_commits"]
print(f"| {n} small YAML files each written and fsync'ed (every fsync asks for a commit at once) | {float(committed):.2f} s until all committed, {made} commits: {int(made)/float(committed):.0f} commits/s, {int(n)/float(committed):.0f} files/s |")
print(f"| in-memory merge of one YAML document, 1000 fields edited (500 per side), p50 / p99 | {float(g['merge_doc_ms'][0]):.1f} / {float(g['merge_doc_ms'][1]):.1f} ms |")
n, secs = g["converge"]
print(f"| {n} issues edited on both nodes offline (different fields), remote back: until both agree | {float(secs):.2f} s |")
PY
{ printf '\n### Locks (scripts/lockbench.sh)\n\n'; bash scripts/lockbench.sh "$SYNCFS"; } >> "$work/benchmarks.md" 2>>"$errors"
out=docs/benchmarks.md
[ "$BENCH_ON" = tmpfs ] || out=docs/benchmarks-disk.md
# The measured part goes between the markers; hand-written notes around it stay.
python3 - "$out" "$work/benchmarks.md" <<'PY'
import os, sys
out, new = sys.argv[1], open(sys.argv[2]).read()
begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
block = f"{begin}\n{new}{end}\n"
if os.path.exists(out) and begin in (old := open(out).read()) and end in old:
    head, rest = old.split(begin, 1)
    tail = rest.split(end, 1)[1]
    text = head + block + tail.lstrip("\n")
else:
    text = block
open(out, "w").write(text)
PY
echo "bench.sh: wrote $out"
cat "$work/benchmarks.md"
