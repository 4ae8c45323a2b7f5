#!/usr/bin/env bash
# Sets up and runs every test: unit tests, core tests, and the mount tests (real FUSE mounts;
# needs root and /dev/fuse). Exits non-zero on any failure.
#
#   scripts/test.sh          the suite CI runs (fault suites in their short variants)
#   scripts/test.sh --soak   the fault suites' long variants only (>= 1,000 kill points,
#                            20-30 s cuts; about 15 minutes), figures in docs/reliability.md
set -euo pipefail
cd "$(dirname "$0")/.."
soak=0
for arg in "$@"; do
  case "$arg" in
    --soak) soak=1 ;;
    *) echo "usage: scripts/test.sh [--soak]" >&2; exit 2 ;;
  esac
done
scripts/install-deps.sh
. scripts/env.sh

# Leftovers of an earlier run that was killed: test mounts, their daemons and servers.
cleanup() {
  for m in $(awk '$2 ~ /syncfs-test-/ {print $2}' /proc/mounts); do
    umount -l "$m" 2>/dev/null || true
  done
  pkill -f 'syncfs mount /tmp/syncfs-test-' 2>/dev/null || true
}
cleanup
trap cleanup EXIT

started=$(date +%s)
cargo build --release --locked --all-targets
if [ "$soak" = 1 ]; then
  SYNCFS_SOAK=1 timeout --kill-after=30 "${SYNCFS_TEST_TIMEOUT:-5400}" \
    cargo test --release --locked --test mount -- faults:: damage:: disk:: --test-threads=1
  echo "test.sh: soak runs passed in $(( $(date +%s) - started )) s"
  exit 0
fi
# Mount tests start their own daemons; a few at a time keeps two cores busy without timeouts.
# A hung filesystem must fail the run, not stall CI: the whole suite gets 25 minutes.
timeout --kill-after=30 "${SYNCFS_TEST_TIMEOUT:-1500}" \
  cargo test --release --locked -- --test-threads="${SYNCFS_TEST_THREADS:-4}"
echo "test.sh: all tests passed in $(( $(date +%s) - started )) s"
