#!/usr/bin/env bash
# Sets up and runs syncfs with its embedded defaults: installs the dependencies, builds a
# release binary, installs it as /usr/local/bin/syncfs (when writable) and mounts a sync root
# at $1, or $SYNCFS_MOUNT, or ~/syncfs. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
. scripts/env.sh
cargo build --release --locked

bin="$PWD/target/release/syncfs"
if [ -w /usr/local/bin ]; then
  install -m 0755 "$bin" /usr/local/bin/syncfs
  bin=/usr/local/bin/syncfs
fi

mnt="${1:-${SYNCFS_MOUNT:-$HOME/syncfs}}"
mkdir -p "$mnt"
if "$bin" status "$mnt" >/dev/null 2>&1; then
  echo "syncfs is already mounted at $mnt"
else
  # A stale mount left by a crashed daemon is cleaned up first.
  if "$bin" status "$mnt" 2>&1 | grep -q "stale mount"; then
    "$bin" umount "$mnt"
  fi
  "$bin" mount "$mnt"
fi

cat <<TOUR

Try it:
  cd $mnt
  mkdir -p durable/issues && printf 'id: 1\ntitle: Crash\n' > durable/issues/1.yml
  getfattr -n user.syncfs.tier durable/issues/1.yml
  ls .syncfs/history/durable/issues/1.yml/
  (set -o noclobber; echo me > fast/claims/job1)
  (set -o noclobber; echo you > fast/claims/job1)
  getfattr -d -m - fast/claims/job1
  syncfs policy explain --mount $mnt fast/claims/job1
  syncfs status $mnt
  syncfs umount $mnt
TOUR
