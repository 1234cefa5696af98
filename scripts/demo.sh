#!/usr/bin/env bash
# ASMN's main job, as root on a fresh Debian 12 machine: the demo tenant.
#
# Installs what it needs, builds the project (release), then runs `asmn-lab demo`: Sec-EM,
# a client, a server behind the VNF-G/W gateway and a fake VNF, each in its own network
# namespace, narrated step by step, with a summary table at the end. It removes every
# namespace, process and TUN device it made, also on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
asmn_deps

echo "==> building ASMN (release; a few minutes the first time)"
cargo build --release --locked --quiet --workspace --bins
echo
exec target/release/asmn-lab demo "$@"
