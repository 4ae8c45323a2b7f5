#!/usr/bin/env bash
# Locks between programs and nodes, timed in one run (issue 11): syncfs's cluster flock, the
# claim idiom (noclobber create + rm) and etcd's lock (`etcdctl lock`), each as the command a
# program runs, with the cost of starting a process measured beside them (`true`). Handover:
# a holder on node A says when it lets go, a waiter on node B says when it got the lock.
# Prints a Markdown table; scripts/bench.sh puts it into docs/benchmarks.md.
#   ROUNDS=30 HANDOVERS=15 scripts/lockbench.sh [SYNCFS_BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-30}
HANDOVERS=${HANDOVERS:-15}
SYNCFS=${1:-$PWD/target/release/syncfs}
missing=()
for tool in etcd:etcd-server etcdctl:etcd-client flock:util-linux nats-server:nats-server; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
work=$(mktemp -d /var/tmp/syncfs-lockbench.XXXXXX)
pids=()
cleanup() {
  for m in "$work"/*-mnt; do "$SYNCFS" umount "$m" >/dev/null 2>&1 || umount -l "$m" 2>/dev/null || true; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
nats_port=$(port); etcd_port=$(port); peer_port=$(port)
nats-server -js -a 127.0.0.1 -p "$nats_port" -sd "$work/nats" -l "$work/nats.log" & pids+=($!)
etcd --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$etcd_port" \
     --advertise-client-urls "http://127.0.0.1:$etcd_port" --listen-peer-urls "http://127.0.0.1:$peer_port" \
     >"$work/etcd.log" 2>&1 & pids+=($!)
sleep 1
printf 'policies:\n  - pattern: "fast/claims/**"\n    tier: nats-kv\n    consistency: cas-create\n  - pattern: "fast/**"\n    tier: nats-kv\n    consistency: lww\n' > "$work/table.yml"
printf 'policies_seed: %s\n' "$work/table.yml" > "$work/config.yml"
for n in a b; do
  mkdir -p "$work/$n-mnt"
  "$SYNCFS" mount "$work/$n-mnt" --state "$work/$n" --node "$n" --nats "nats://127.0.0.1:$nats_port" --config "$work/config.yml" >/dev/null
done
mkdir -p "$work/a-mnt/fast/casual" "$work/a-mnt/fast/claims" "$work/local"
echo 0 > "$work/a-mnt/fast/casual/lock"; echo 0 > "$work/local/lock"
sleep 1
export ETCDCTL_API=3
etcd="etcdctl --endpoints=http://127.0.0.1:$etcd_port"
python3 - "$work" "$ROUNDS" "$HANDOVERS" "$etcd" <<'PY'
import statistics, subprocess, sys, time
work, rounds, handovers, etcd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
A, B = f"{work}/a-mnt", f"{work}/b-mnt"
def timed(cmd, cwd):
    t = time.perf_counter()
    subprocess.run(cmd, shell=True, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return (time.perf_counter() - t) * 1000
cases = [
    ("process start (`true`), the floor of every row", "true", A),
    ("`flock -x` + release, local disk (kernel lock)", f"flock -x {work}/local/lock true", A),
    ("`flock -x` + release, syncfs KV path (cluster lock)", "flock -x fast/casual/lock true", A),
    ("claim idiom: `set -C; echo > claims/x` + `rm`, syncfs cas-create", "sh -c 'set -C; echo me > fast/claims/x && rm fast/claims/x'", A),
    ("`etcdctl lock` + release, etcd 3.4 on loopback", f"{etcd} lock bench true", A),
]
results = {name: [] for name, _, _ in cases}
for _ in range(rounds):  # interleaved, so drift hits every row alike
    for name, cmd, cwd in cases:
        results[name].append(timed(cmd, cwd))
def handover(hold, wait):
    """A holds, says when it lets go; B, waiting, says when it got the lock."""
    out = []
    for _ in range(handovers):
        h = subprocess.Popen(hold, shell=True, cwd=A, stdout=subprocess.PIPE, text=True)
        assert h.stdout.readline().strip() == "held"
        w = subprocess.Popen(wait, shell=True, cwd=B, stdout=subprocess.PIPE, text=True)
        time.sleep(0.3)  # B is waiting by now
        released = int(h.stdout.readline())
        got = int(w.stdout.readline())
        h.wait(); w.wait()
        out.append((got - released) / 1e6)
    return out
ho = {
    "handover A -> B, syncfs `flock` (B blocked in `flock -x`)":
        handover("flock -x fast/casual/lock sh -c 'echo held; sleep 0.5; date +%s%N'", "flock -x fast/casual/lock date +%s%N"),
    "handover A -> B, `etcdctl lock` (B blocked in `etcdctl lock`)":
        handover(f"{etcd} lock hand -- sh -c 'echo held; sleep 0.5; date +%s%N'", f"{etcd} lock hand -- date +%s%N"),
}
print("| lock operation (one command per acquisition) | p50 | p90 |")
print("|---|---|---|")
for name, xs in list(results.items()) + list(ho.items()):
    xs = sorted(xs)
    print(f"| {name} | {statistics.median(xs):.1f} ms | {xs[int(len(xs) * 0.9) - 1]:.1f} ms |")
print(f"\n{rounds} rounds of each command (interleaved), {handovers} handovers; every figure includes the process start of the first row.")
PY
