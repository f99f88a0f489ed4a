#!/usr/bin/env bash
# The whole test suite, as CI runs it: install pinned peers, then format, lint and every test
# (unit, component, and end-to-end against real mounts). Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "scripts/test.sh mounts filesystems and installs packages: run it as root" >&2
  exit 1
fi
scripts/install-peers.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --locked --no-fail-fast
