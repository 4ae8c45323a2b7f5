#!/usr/bin/env bash
# Installs everything syncfs needs to build, run, test and benchmark. Idempotent: installs only
# what is missing, so a second run does no network work. Needs root (or sudo).
set -euo pipefail

# fuse3: fusermount3 and /etc/fuse.conf; attr: getfattr/setfattr; util-linux: setpriv;
# bindfs: the benchmark's FUSE baseline; gcc/libc6-dev: crates that build C code;
# pkg-config/libssl-dev: libgit2's https and ssh transports; libacl1-dev: pjdfstest's ACL
# bindings (exacl) link libacl; sqlite3: the cross-node database test; util-linux also gives
# flock(1), the lock tests' tool.
PACKAGES=(fuse3 attr git bindfs python3 util-linux coreutils gcc libc6-dev ca-certificates curl debian-archive-keyring
          pkg-config libssl-dev libacl1-dev sqlite3)

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

# nats-server 2.10 or newer. Debian 12's own package is 2.9.10, which async-nats cannot create
# KV buckets on and whose compare-and-swap is unsafe on replicated buckets, so take the one of
# Debian's next suite (trixie) through a private apt configuration: its own sources list, lists
# and cache under /var/lib/syncfs/apt, the same archive as the system's sources. The system's
# apt sources are not touched. The .deb needs only libc; its binary is extracted to
# /usr/local/bin (installing the package would also enable a system-wide nats-server service).
nats_ok() {
  local v
  v=$(nats-server --version 2>/dev/null | sed -n 's/.*v\([0-9][0-9.]*\).*/\1/p')
  [ -n "$v" ] && [ "$(printf '%s\n2.10.0\n' "$v" | sort -V | head -1)" = "2.10.0" ]
}
if ! nats_ok; then
  echo "install-deps: installing nats-server >= 2.10 from Debian trixie (private apt configuration)"
  apt_dir=/var/lib/syncfs/apt
  uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  if [ -z "$uri" ]; then
    uri=$(awk '$1 == "deb" && $2 !~ /^\[/ {print $2; exit} $1 == "deb" && $2 ~ /^\[/ {for (i = 3; i <= NF; i++) if ($i ~ /:\/\//) {print $i; exit}}' /etc/apt/sources.list 2>/dev/null || true)
  fi
  uri=${uri:-http://deb.debian.org/debian}
  $SUDO mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/debs"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri trixie main" | $SUDO tee "$apt_dir/sources.list" >/dev/null
  apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
            -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache"
            -o "APT::Sandbox::User=root" -o "Debug::NoLocking=1")
  $SUDO apt-get "${apt_opts[@]}" update -qq
  (cd "$apt_dir/debs" && $SUDO rm -f nats-server_*.deb && $SUDO apt-get "${apt_opts[@]}" download -qq nats-server)
  deb=$(ls "$apt_dir"/debs/nats-server_*.deb | head -1)
  rm -rf "$apt_dir/root"
  $SUDO dpkg-deb -x "$deb" "$apt_dir/root"
  $SUDO install -m 0755 "$apt_dir/root/usr/sbin/nats-server" /usr/local/bin/nats-server
  hash -r
  nats_ok || { echo "install-deps: nats-server from $deb is not >= 2.10" >&2; exit 1; }
  echo "install-deps: $(nats-server --version) installed as /usr/local/bin/nats-server"
fi

# The Rust toolchain (stable). Machines that have one keep it.
if ! command -v cargo >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
  echo "install-deps: installing the Rust toolchain with rustup"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
fi

# The POSIX suites the mount tests run as regression gates (mount-tests/posix.rs): the Rust
# pjdfstest and fsx from crates.io, pinned, so a new release cannot change what the gate
# checks. Built with their own lock files (--locked) into a root of the project's, not
# ~/.cargo/bin, so the tests find exactly these versions; rebuilt only when a binary is missing
# or reports another version, since each build takes minutes on two cores.
TOOLS_ROOT=/var/lib/syncfs/tools
POSIX_TOOLS=(pjdfstest@0.2.2 fsx@0.3.2)
for tool in "${POSIX_TOOLS[@]}"; do
  name=${tool%@*} version=${tool#*@}
  if [ "$("$TOOLS_ROOT/bin/$name" --version 2>/dev/null)" != "$name $version" ]; then
    echo "install-deps: building $name $version into $TOOLS_ROOT"
    # shellcheck disable=SC1091
    . "$(dirname "$0")/env.sh"
    $SUDO env "PATH=$PATH" cargo install --quiet --locked --force --root "$TOOLS_ROOT" --version "$version" "$name"
  fi
done

# tbd (npm get-tbd), pinned: the end-to-end test of the issue tracker on two nodes
# (mount-tests/tbd.rs). It needs node and git >= 2.42; npm comes with Debian's nodejs.
TBD_VERSION=0.2.3
TBD_ROOT=$TOOLS_ROOT/tbd
if [ "$("$TBD_ROOT/node_modules/.bin/tbd" --version 2>/dev/null)" != "$TBD_VERSION" ]; then
  command -v npm >/dev/null || { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null; }
  echo "install-deps: installing get-tbd $TBD_VERSION into $TBD_ROOT"
  $SUDO mkdir -p "$TBD_ROOT"
  $SUDO npm install --silent --no-audit --no-fund --prefix "$TBD_ROOT" "get-tbd@$TBD_VERSION"
fi

if [ ! -e /dev/fuse ]; then
  echo "install-deps: warning: /dev/fuse is missing; mounting will fail (load the fuse module, or run the container with --device /dev/fuse)" >&2
fi
