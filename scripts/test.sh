#!/usr/bin/env bash
# The whole test suite, as CI runs it: install pinned peers, then format, lint and every test
# (unit, component, and end-to-end against real mounts). Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "scripts/test.sh mounts filesystems and installs packages: run it as root" >&2
  exit 1
fi
scripts/install-peers.sh --image

# A fresh clone gains nothing from incremental caches, and they double the target directory.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=0; fi
NEED_GB=8
free_gb=$(( $(df -k --output=avail . | tail -1) / 1048576 ))
echo "== disk: ${free_gb} GB free where target/ is built; a full run from a fresh clone needs about ${NEED_GB} GB"
if [ "$free_gb" -lt "$NEED_GB" ]; then
  echo "warning: less than ${NEED_GB} GB free: the build may fail with 'No space left on device'" >&2
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy --workspace --all-targets --locked --features test-controller -- -D warnings
echo "== one TLS stack: no OpenSSL anywhere in the dependency tree"
if cargo tree --workspace --locked --all-features -e normal,build --prefix none | grep -Eiq '^(openssl|openssl-sys|native-tls) '; then
  cargo tree --workspace --locked --all-features -i openssl-sys >&2 || true
  echo "OpenSSL is in the dependency tree: keybroker uses rustls only" >&2; exit 1
fi
echo "== deploy/: render the Helm chart and validate against the Kubernetes schemas"
scripts/validate-deploy.sh
echo "== release binary carries no test-only controller"
cargo build --release --locked --quiet
if target/release/keybroker node --danger-test-controller --node-id x --endpoint unix:///tmp/keybroker-release-check.sock \
     --bindings deploy/examples/bindings.yaml --state-dir /tmp/keybroker-release-check --metrics-addr 127.0.0.1:0 \
     --audit-log /tmp/keybroker-release-check/audit.jsonl 2>/tmp/keybroker-release-check.err; then
  echo "the release build accepted --danger-test-controller" >&2; exit 1
fi
grep -q "no test controller" /tmp/keybroker-release-check.err || { cat /tmp/keybroker-release-check.err >&2; exit 1; }
echo "== container image: build offline, run --version and an init inside it (scripts/build-image.sh)"
scripts/build-image.sh
echo "== a real Kubernetes cluster's components, pinned (scripts/cluster.sh build; cached by version)"
scripts/cluster.sh build
echo "== fuzz every parser of untrusted input, 30 s each (scripts/fuzz.sh)"
scripts/fuzz.sh 30
echo "== cargo test (csi-sanity needs the test-only controller: --features test-controller)"
status=0
cargo test --locked --no-fail-fast --workspace --features test-controller || status=$?
echo "== no keybroker mount may be left on this machine (they can hold secrets), nor a cluster or a test cgroup"
if [ -d /run/keybroker-cluster ] || ip netns list 2>/dev/null | grep '^kb-cluster' >/dev/null; then
  echo "a test cluster was left running: scripts/cluster.sh down" >&2
  scripts/cluster.sh down || true
  status=1
fi
if [ -d /sys/fs/cgroup/pids/kubepods-keybroker-test ]; then
  echo "a test pod cgroup was left behind: /sys/fs/cgroup/pids/kubepods-keybroker-test" >&2
  find /sys/fs/cgroup/pids/kubepods-keybroker-test -depth -type d -exec rmdir {} \; 2>/dev/null || true
  status=1
fi
left=$(awk '$0 ~ / - (tmpfs|fuse[^ ]*) keybroker / {print $5}' /proc/self/mountinfo)
if [ -n "$left" ]; then
  echo "keybroker mounts left behind by the tests:" >&2
  echo "$left" >&2
  exit 1
fi
exit "$status"
