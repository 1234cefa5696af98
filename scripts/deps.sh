#!/usr/bin/env bash
# Installs what building and testing ASMN needs on Debian 12, as root. Sourced by
# demo.sh and test.sh; safe to run again (it installs only what is missing).
set -euo pipefail

APT_PACKAGES=(
  build-essential pkg-config libssl-dev   # the Rust build: cc for the hash assembly, libcrypto
  protobuf-compiler libprotobuf-dev       # etcd-client's build script (protoc + well-known types)
  etcd-server                             # etcd 3.4, started by the store tests on loopback
  openssl coreutils python3               # baselines and cross-checks of the measurement tests
  libarchive-zip-perl                     # `crc32`, zlib's CRC32, a measurement baseline
  ca-certificates curl git
  iproute2 iputils-ping iperf3 tcpdump          # the network-namespace tests of the agent
  procps                                        # `kill`: tests stop what they started, by PID
  wireguard-tools                               # `wg`: the interoperability test configures boringtun-cli
  fonts-dejavu-core                             # the font of asmn-lab eval's charts
  lintian systemd                               # scripts/package.sh --check: lintian, systemd-analyze
  prometheus                                    # promtool: the alert rules in docs/monitoring
  python3-venv                                  # the REST API's checkers (asmn_python_tools)
)

asmn_need_root() {
  if [[ $(id -u) -ne 0 ]]; then
    echo "error: run this as root (sudo $0): it installs Debian packages." >&2
    exit 1
  fi
}

asmn_install_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    echo "==> installing Debian packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

asmn_install_rust() {
  if [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    echo "==> installing the Rust toolchain with rustup (stable)"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
  local v
  v=$(rustc --version | awk '{print $2}')
  if ! printf '1.90.0\n%s\n' "$v" | sort -V -C; then
    echo "error: Rust $v is too old; ASMN needs 1.90 or newer (rustup update stable)." >&2
    exit 1
  fi
}

asmn_deps() {
  asmn_need_root
  asmn_install_apt
  asmn_install_rust
}

# Tools only the tests use: boringtun-cli, the unmodified WireGuard implementation the
# agent's tunnels are checked against.
asmn_test_tools() {
  if ! command -v boringtun-cli >/dev/null 2>&1; then
    echo "==> installing boringtun-cli 0.7.1 (cargo install)"
    cargo install boringtun-cli --locked --version 0.7.1 --quiet
  fi
}

# The REST API's checkers, from PyPI into a virtual environment (target/venv, or
# ASMN_VENV): openapi-spec-validator for docs/openapi.json, schemathesis against a live
# Sec-EM (controller/tests/rest.rs). Pinned: their command lines change between releases.
asmn_python_tools() {
  export ASMN_VENV="${ASMN_VENV:-$PWD/target/venv}"
  if [[ ! -x "$ASMN_VENV/bin/st" || ! -x "$ASMN_VENV/bin/openapi-spec-validator" ]]; then
    echo "==> installing openapi-spec-validator and schemathesis (pip, in $ASMN_VENV)"
    python3 -m venv "$ASMN_VENV"
    "$ASMN_VENV/bin/pip" install --quiet --disable-pip-version-check \
      'openapi-spec-validator==0.9.0' 'schemathesis==4.32.5'
  fi
}
