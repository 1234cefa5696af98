#!/usr/bin/env bash
# Builds the Debian packages asmn-sec-em (sec-em, asmnctl, their unit, the asmn user) and
# asmn-agent (the agent, its units, the config-drive hook) with cargo-deb (installed with
# `cargo install` when missing), into target/debian/.
#
#   scripts/package.sh           build both packages (release)
#   scripts/package.sh --check   build them, then check them as CI does, as root:
#                                lintian (no errors), dpkg -i, systemd-analyze verify of
#                                the units, owners and modes, then dpkg --purge
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
asmn_install_rust

check=false
case "${1:-}" in
  --check) check=true ;;
  "") ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

if ! command -v cargo-deb >/dev/null 2>&1; then
  echo "==> installing cargo-deb 3.8.0 (cargo install)"
  cargo install cargo-deb --locked --version 3.8.0 --quiet
fi

echo "==> building the release binaries and the packages (target/debian/)"
cargo build --release --locked -p asmn-controller --bin sec-em --bin asmnctl -p asmn-agent --bin asmn-agent
mkdir -p target/debian
for crate in asmn-controller asmn-agent; do
  cargo deb --no-build --locked -p "$crate" --strip --output target/debian/
done
ls -l target/debian/*.deb

$check || exit 0

[[ $(id -u) -eq 0 ]] || { echo "error: --check installs the packages: run it as root" >&2; exit 1; }
debs=(target/debian/asmn-sec-em_*.deb target/debian/asmn-agent_*.deb)
fail() { echo "package check failed: $*" >&2; exit 1; }

echo "==> lintian (errors fail the check; warnings are shown)"
out=$(lintian --no-tag-display-limit "${debs[@]}" 2>&1 || true)
echo "$out"
if grep -q '^E: ' <<<"$out"; then
  fail "lintian reports errors"
fi

for p in asmn-sec-em asmn-agent; do
  if dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    fail "$p is already installed here; remove it first (this check installs and purges it)"
  fi
done
trap 'dpkg --purge asmn-sec-em asmn-agent >/dev/null 2>&1 || true' EXIT

echo "==> dpkg -i"
dpkg -i "${debs[@]}"

echo "==> systemd-analyze verify"
for unit in asmn-sec-em.service asmn-agent.service asmn-bundle.service; do
  [[ -f /lib/systemd/system/$unit ]] || fail "$unit is not installed"
done
# Units referring to binaries, users and directories the packages installed; verify
# fails on any unknown or invalid setting.
# It exits 0 on unknown keys and invalid values (it only warns): any output fails too.
verify=$(SYSTEMD_LOG_LEVEL=notice systemd-analyze verify \
  /lib/systemd/system/asmn-sec-em.service \
  /lib/systemd/system/asmn-agent.service \
  /lib/systemd/system/asmn-bundle.service 2>&1) || fail "systemd-analyze verify: $verify"
[[ -z $verify ]] || fail "systemd-analyze verify warns: $verify"
echo "    asmn-sec-em.service asmn-agent.service asmn-bundle.service: no warning"

echo "==> owners and modes"
expect() { # path owner:group mode
  local got
  got=$(stat -c '%U:%G %a' "$1") || fail "$1 is missing"
  [[ $got == "$2 $3" ]] || fail "$1 is $got, expected $2 $3"
  echo "    $1 $got"
}
getent passwd asmn >/dev/null || fail "no user asmn"
getent passwd asmn-agent >/dev/null || fail "no user asmn-agent"
id -nG asmn-agent | grep -qw disk || fail "asmn-agent is not in group disk (it reads the image)"
[[ $(getent passwd asmn | cut -d: -f7) == /usr/sbin/nologin ]] || fail "asmn has a login shell"
expect /usr/bin/sec-em root:root 755
expect /usr/bin/asmnctl root:root 755
expect /usr/bin/asmn-agent root:root 755
expect /usr/lib/asmn/asmn-bundle root:root 755
expect /etc/asmn asmn:asmn 750
expect /var/lib/asmn asmn:asmn 750
expect /var/lib/asmn-agent asmn-agent:asmn-agent 700
expect /lib/systemd/system/asmn-sec-em.service root:root 644
# The agent's units are enabled (a VNF image boots into them); Sec-EM's waits for init.
[[ -L /etc/systemd/system/multi-user.target.wants/asmn-agent.service ]] || fail "asmn-agent.service is not enabled"
[[ ! -e /etc/systemd/system/multi-user.target.wants/asmn-sec-em.service ]] || fail "asmn-sec-em.service was enabled before sec-em init"
# The installed binaries run, and sec-em init as the asmn user writes keys it owns.
sec-em --version >/dev/null
asmn-agent --version >/dev/null
runuser -u asmn -- sec-em init --dir /etc/asmn --listen 127.0.0.1:7443 \
  --store-file /var/lib/asmn/sec-em.redb >/dev/null
expect /etc/asmn/server.key asmn:asmn 600
runuser -u asmn -- sec-em check-config --config /etc/asmn/sec-em.toml >/dev/null
rm -f /etc/asmn/*

echo "==> dpkg --purge"
dpkg --purge asmn-sec-em asmn-agent
trap - EXIT
for f in /usr/bin/sec-em /usr/bin/asmnctl /usr/bin/asmn-agent /lib/systemd/system/asmn-sec-em.service \
  /lib/systemd/system/asmn-agent.service /etc/asmn /var/lib/asmn /var/lib/asmn-agent \
  /etc/systemd/system/multi-user.target.wants/asmn-agent.service; do
  [[ ! -e $f ]] || fail "$f is still there after the purge"
done
echo "packages check: ok"
