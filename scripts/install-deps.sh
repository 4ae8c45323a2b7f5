#!/usr/bin/env bash
# Installs everything syncfs needs to build, run, test and benchmark. Idempotent: installs only
# what is missing, so a second run does no network work. Needs root (or sudo).
set -euo pipefail

# fuse3: fusermount3 and /etc/fuse.conf; attr: getfattr/setfattr; util-linux: setpriv;
# bindfs: the benchmark's FUSE baseline; gcc/libc6-dev: crates that build C code.
PACKAGES=(fuse3 attr git bindfs python3 util-linux coreutils gcc libc6-dev ca-certificates curl)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The Rust toolchain (stable). Machines that have one keep it.
if ! command -v cargo >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
  echo "install-deps: installing the Rust toolchain with rustup"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
fi

if [ ! -e /dev/fuse ]; then
  echo "install-deps: warning: /dev/fuse is missing; mounting will fail (load the fuse module, or run the container with --device /dev/fuse)" >&2
fi
