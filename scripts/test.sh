#!/usr/bin/env bash
# Sets up and runs every test: unit tests, core tests, and the mount tests (real FUSE mounts;
# needs root and /dev/fuse). Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
. scripts/env.sh

started=$(date +%s)
cargo build --release --locked --all-targets
# Mount tests start their own daemons; a few at a time keeps two cores busy without timeouts.
cargo test --release --locked -- --test-threads="${SYNCFS_TEST_THREADS:-4}"
echo "test.sh: all tests passed in $(( $(date +%s) - started )) s"
