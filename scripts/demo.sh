#!/usr/bin/env bash
# ASMN's main job, as root on a fresh Debian 12 machine.
#
# The demo tenant (Sec-EM, agents and a gateway in network namespaces, asmn-lab demo)
# does not exist yet: until it does, this runs what exists, the measurement core, on
# generated VNF images, and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
asmn_deps

echo "==> building asmn-image (release)"
cargo build --release --locked --quiet -p asmn-images
bin=target/release/asmn-image

work=$(mktemp -d /var/tmp/asmn-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT

cat <<'TXT'

ASMN demo, stage 1 of the project: measuring VNF images.
The tenant demo (Sec-EM, agents, WireGuard tunnels, the VNF-G/W gateway) arrives with
`asmn-lab demo`; this script will run it then. What runs now is the measurement that every
agent performs at enrollment: one pass over the image, every digest at once.

TXT
size=${ASMN_DEMO_SIZE:-500M}
echo "==> two generated images of $size: the genuine one, and a copy with one byte changed"
"$bin" make-test "$work/vnf.img" --size "$size" --seed 7
cp "$work/vnf.img" "$work/fake.img"
printf '\x01' | dd of="$work/fake.img" bs=1 seek=12345 conv=notrunc status=none

echo
echo "==> measuring the genuine image with all five algorithms in one pass"
"$bin" measure "$work/vnf.img" --algo crc32,md5,sha1,sha256,sha512

echo
echo "==> comparing the genuine image with the fake one (exit code 1 = different)"
set +e
"$bin" compare "$work/vnf.img" "$work/fake.img" --algo crc32,md5,sha1,sha256
rc=$?
set -e
if [[ $rc -ne 1 ]]; then
  echo "error: the one-byte change was not detected (exit $rc)" >&2
  exit 1
fi

echo
echo "==> our measurement beside openssl, coreutils and zlib on the same file"
"$bin" bench "$work/vnf.img" --repeat 1

echo
echo "Done: the fake image was told apart by every digest. Nothing was left behind."
