#!/usr/bin/env bash
# A real single-node Kubernetes cluster on this machine, from the registries only (issue #22).
#
#   scripts/cluster.sh build   # pinned components: kube-apiserver, kubelet, kubectl,
#                              # kube-controller-manager, kube-scheduler built from the Go module
#                              # k8s.io/kubernetes; the Secrets Store CSI driver from its module;
#                              # etcd, containerd, runc, CNI from Debian
#   scripts/cluster.sh up      # a network namespace of its own (its loopback, with the node's
#                              # address on it too: nothing routed out), etcd, containerd, the control
#                              # plane and kubelet; waits for a Ready node
#   scripts/cluster.sh down    # stops everything it started; unmounts, removes cgroups,
#                              # restores sysctls, deletes the namespace
#   scripts/cluster.sh restart-kubelet   # stop and start kubelet (pods keep running)
#   scripts/cluster.sh kubectl ARGS...   (and helm ARGS...: against the running cluster)
#
# Built binaries are cached outside the clone, keyed by version, in $KEYBROKER_CLUSTER_CACHE
# (default /var/cache/keybroker-cluster): a fresh machine builds them once (about 6 minutes of
# two cores, kube-apiserver most of it). The running cluster's state is in $KB_CLUSTER_RUN
# (default /run/keybroker-cluster); kubelet's root is /var/lib/kubelet, as CSI drivers expect.
set -Eeuo pipefail
# A failing command names itself: `set -e` alone ends the script silently.
trap 'rc=$?; printf "[cluster] failed (exit %s) at line %s: %s\n" "$rc" "$LINENO" "$BASH_COMMAND" >&2' ERR

KUBE_VERSION="v1.35.4"                    # k8s.io/kubernetes (Go module, exact version)
KUBE_STAGING_VERSION="v0.35.4"            # its staging modules, as published
ETCD_VERSION="3.4.23-4+b4"                # Debian etcd-server
CONTAINERD_VERSION="1.6.20~ds1-1+deb12u3" # Debian containerd
RUNC_VERSION="1.1.5+ds1-1+deb12u1"        # Debian runc (crun refuses hybrid cgroups)
CNI_VERSION="1.1.1+ds1-3+b5"              # Debian containernetworking-plugins (loopback)
IPTABLES_VERSION="1.8.9-2"                # Debian iptables (the kubernetes Service's DNAT rule)
DNSMASQ_VERSION="2.90-4~deb12u2"          # Debian dnsmasq-base (the cluster's DNS)
BUSYBOX_VERSION="1:1.35.0-4+deb12u1+b1"   # Debian busybox-static (the busybox image)
BUILDAH_VERSION="1.28.2+ds1-3+deb12u1+b3" # Debian buildah (images, vfs storage)
COMPONENTS=(kube-apiserver kubelet kubectl kube-controller-manager kube-scheduler)
SSCSI_VERSION="v1.6.0"                    # sigs.k8s.io/secrets-store-csi-driver (Go module)
AZURE_PROVIDER_VERSION="v1.7.2"           # github.com/Azure/secrets-store-csi-driver-provider-azure
VAULT_CSI_PROVIDER_VERSION="v1.7.4"       # github.com/hashicorp/vault-csi-provider (benchmark only)
# Its Go module is not served: a snapshot of its repository (a git directory, as the project's
# `fetch` tool leaves it) is built when present; the benchmark measures without it otherwise.
VAULT_CSI_PROVIDER_GIT="${VAULT_CSI_PROVIDER_GIT:-/work/.mirror/hashicorp+vault-csi-provider/repo}"

NETNS=kb-cluster
NODE=kb-node
NODE_IP=10.213.0.1          # on the loopback link of $NETNS only
SERVICE_IP=10.96.0.1        # the `kubernetes` Service (first of --service-cluster-ip-range)
POD_CIDR=10.244.0.0/24      # pod addresses, on a bridge inside $NETNS
DNS_IP=10.96.0.10           # the cluster's DNS (kubelet's clusterDNS)
run="${KB_CLUSTER_RUN:-/run/keybroker-cluster}"
KUBELET_DIR=/var/lib/kubelet
PROVIDER_DIRS=(/etc/kubernetes/secrets-store-csi-providers /run/secrets-store-csi-providers)
# Host sysctls kubelet sets; saved at `up`, restored at `down`.
SYSCTLS=(kernel.panic kernel.panic_on_oops vm.overcommit_memory vm.panic_on_oom kernel.keys.root_maxkeys kernel.keys.root_maxbytes)

cache="${KEYBROKER_CLUSTER_CACHE:-/var/cache/keybroker-cluster}/$KUBE_VERSION"
log() { printf '[cluster] %s\n' "$*"; }
# shellcheck source=scripts/lib/apt.sh
. "$(dirname "$0")/lib/apt.sh"

build() {
  mkdir -p "$cache/bin"
  local missing=()
  for c in "${COMPONENTS[@]}"; do
    [ -x "$cache/bin/$c" ] || missing+=("$c")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    command -v go >/dev/null || { log "go is required to build Kubernetes"; exit 1; }
    log "go mod download k8s.io/kubernetes@$KUBE_VERSION"
    local dir work
    dir=$(cd /tmp && GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" |
          python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
    work=$(mktemp -d)
    trap 'rm -rf "$work"' RETURN
    cp -r "$dir/." "$work/"
    chmod -R u+w "$work"
    # The module zip has no staging/ (nested modules are left out) and ships a go.work: build
    # against the published staging modules instead.
    rm -f "$work/go.work" "$work/go.work.sum"
    sed -i -E "s#^(\s*)k8s.io/([a-z0-9-]+) => ./staging/src/k8s.io/[a-z0-9-]+#\1k8s.io/\2 => k8s.io/\2 $KUBE_STAGING_VERSION#" "$work/go.mod"
    if grep -q "=> ./staging" "$work/go.mod"; then
      log "go.mod still names ./staging after the rewrite"; exit 1
    fi
    local minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
    local ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION"
    ldflags+=" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
    ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION"
    for c in "${missing[@]}"; do
      log "go build cmd/$c"
      (cd "$work" && GOWORK=off GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" \
        -o "$cache/bin/$c.tmp" "./cmd/$c")
      mv "$cache/bin/$c.tmp" "$cache/bin/$c"
    done
  fi
  build_secrets_store_driver
  build_azure_provider
  build_vault_csi_provider
  if apt_install_pinned "etcd-server=$ETCD_VERSION" "containerd=$CONTAINERD_VERSION" "runc=$RUNC_VERSION" \
       "containernetworking-plugins=$CNI_VERSION" "busybox-static=$BUSYBOX_VERSION" "buildah=$BUILDAH_VERSION" \
       "iptables=$IPTABLES_VERSION" "dnsmasq-base=$DNSMASQ_VERSION"; then
    # The packages start their services; the cluster runs its own, in its own namespace.
    systemctl disable --now etcd containerd >/dev/null 2>&1 || true
    pkill -x etcd 2>/dev/null || true
    pkill -x containerd 2>/dev/null || true
  fi
  for c in "${COMPONENTS[@]}"; do
    if [ "$c" = kubectl ]; then
      log "$c $("$cache/bin/kubectl" version --client 2>/dev/null | sed -n 1p)"
    else
      log "$c $("$cache/bin/$c" --version 2>/dev/null | sed -n 1p)"
    fi
  done
  log "etcd $(dpkg-query -W -f='${Version}' etcd-server), containerd $(dpkg-query -W -f='${Version}' containerd), runc $(dpkg-query -W -f='${Version}' runc)"
}

# The Secrets Store CSI driver's own command (cmd/secrets-store-csi-driver of its module at
# $SSCSI_VERSION), for the tests that run keybroker's provider mode behind the real driver. Its
# log package monis.app/mlog is refused by the module proxy: the stand-in of
# tests/driver-harness/mlogstub replaces it (log setup only; klog's lines are unchanged).
build_secrets_store_driver() {
  local bin="$cache/bin/secrets-store-csi-$SSCSI_VERSION"
  [ -x "$bin" ] && return 0
  log "go build sigs.k8s.io/secrets-store-csi-driver@$SSCSI_VERSION ./cmd/secrets-store-csi-driver"
  local dir work stub
  stub=$(cd "$(dirname "$0")/.." && pwd)/tests/driver-harness/mlogstub
  dir=$(cd /tmp && GOFLAGS=-mod=mod go mod download -json "sigs.k8s.io/secrets-store-csi-driver@$SSCSI_VERSION" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  work=$(mktemp -d)
  cp -r "$dir/." "$work/"
  chmod -R u+w "$work"
  (cd "$work" && go mod edit -replace "monis.app/mlog=$stub" &&
    GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath \
      -ldflags "-s -w -X sigs.k8s.io/secrets-store-csi-driver/pkg/version.BuildVersion=$SSCSI_VERSION" \
      -o "$bin.tmp" ./cmd/secrets-store-csi-driver)
  rm -rf "$work"
  mv "$bin.tmp" "$bin"
}

# The Secrets Store CSI driver's Azure provider (cmd/ of its module at $AZURE_PROVIDER_VERSION),
# the peer that runs beside keybroker behind the same driver. The module proxy serves this
# module at exact versions only (its version list is refused).
build_azure_provider() {
  local bin="$cache/bin/provider-azure-$AZURE_PROVIDER_VERSION"
  [ -x "$bin" ] && return 0
  log "go build github.com/Azure/secrets-store-csi-driver-provider-azure@$AZURE_PROVIDER_VERSION ./cmd/"
  local dir work
  dir=$(cd /tmp && GOFLAGS=-mod=mod go mod download -json "github.com/Azure/secrets-store-csi-driver-provider-azure@$AZURE_PROVIDER_VERSION" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
  work=$(mktemp -d)
  cp -r "$dir/." "$work/"
  chmod -R u+w "$work"
  (cd "$work" && GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$bin.tmp" ./cmd/)
  rm -rf "$work"
  mv "$bin.tmp" "$bin"
}

# HashiCorp's Vault CSI provider at $VAULT_CSI_PROVIDER_VERSION from the snapshot of its
# repository, with its deployment manifest beside the binary (benchmarks only).
build_vault_csi_provider() {
  local bin="$cache/bin/vault-csi-provider-$VAULT_CSI_PROVIDER_VERSION"
  [ -x "$bin" ] && return 0
  if ! git --git-dir="$VAULT_CSI_PROVIDER_GIT" rev-parse -q --verify "refs/tags/$VAULT_CSI_PROVIDER_VERSION" >/dev/null 2>&1; then
    log "vault-csi-provider $VAULT_CSI_PROVIDER_VERSION not built: no snapshot of its repository at $VAULT_CSI_PROVIDER_GIT (benchmarks only)"
    return 0
  fi
  log "go build github.com/hashicorp/vault-csi-provider $VAULT_CSI_PROVIDER_VERSION (snapshot $VAULT_CSI_PROVIDER_GIT)"
  local work; work=$(mktemp -d)
  git --git-dir="$VAULT_CSI_PROVIDER_GIT" archive "$VAULT_CSI_PROVIDER_VERSION" | tar -x -C "$work"
  (cd "$work" && GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$bin.tmp" .)
  cp "$work/deployment/vault-csi-provider.yaml" "$cache/vault-csi-provider-$VAULT_CSI_PROVIDER_VERSION.yaml"
  rm -rf "$work"
  mv "$bin.tmp" "$bin"
}

# Runs a command in the cluster's network namespace and nothing else of it: `ip netns exec`
# would also mount a fresh /sys, which hides the cgroup mounts kubelet needs.
in_ns() { nsenter --net="/run/netns/$NETNS" -- "$@"; }

# Starts a long-running process in the namespace, in a session of its own, output to a log.
start() {
  local name=$1; shift
  setsid nsenter --net="/run/netns/$NETNS" -- "$@" >"$run/log/$name.log" 2>&1 < /dev/null &
  echo $! > "$run/pids/$name"
}

kubectl_() {
  in_ns "$cache/bin/kubectl" --kubeconfig "$run/pki/admin.kubeconfig" "$@"
}

# A key and a certificate signed by the cluster CA: NAME CN O [SANs].
cert() {
  local name=$1 cn=$2 o=$3 san=${4:-}
  local d="$run/pki"
  openssl genrsa -out "$d/$name.key" 2048 2>/dev/null
  openssl req -new -key "$d/$name.key" -subj "/CN=$cn${o:+/O=$o}" -out "$d/$name.csr" 2>/dev/null
  local ext="$d/$name.ext"
  printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n' > "$ext"
  if [ -n "$san" ]; then printf 'subjectAltName=%s\n' "$san" >> "$ext"; fi
  openssl x509 -req -in "$d/$name.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
    -days 2 -extfile "$ext" -out "$d/$name.crt" 2>/dev/null
}

kubeconfig() {
  local name=$1
  cat > "$run/pki/$name.kubeconfig" <<KCEOF
apiVersion: v1
kind: Config
clusters:
- name: kb
  cluster: {server: "https://$NODE_IP:6443", certificate-authority: "$run/pki/ca.crt"}
users:
- name: $name
  user: {client-certificate: "$run/pki/$name.crt", client-key: "$run/pki/$name.key"}
contexts:
- name: kb
  context: {cluster: kb, user: $name}
current-context: kb
KCEOF
}

# Waits up to $2 half-seconds for command $3... to succeed; on failure prints $1's log tail.
wait_until() {
  local what=$1 tries=$2; shift 2
  local t=0
  until "$@" >/dev/null 2>&1; do
    t=$((t + 1))
    if [ $t -ge "$tries" ]; then
      log "$what: timed out"; tail -30 "$run/log/$what.log" >&2 || true
      return 1
    fi
    sleep 0.5
  done
}

start_kubelet() {
  start kubelet "$cache/bin/kubelet" --config="$run/kubelet.yaml" \
    --kubeconfig="$run/pki/kubelet.kubeconfig" --hostname-override="$NODE" --node-ip="$NODE_IP" \
    --root-dir="$KUBELET_DIR"
}
kubelet_healthy() {
  in_ns curl -sf http://127.0.0.1:10248/healthz
}
# kubelet stopped and started again, as an upgrade or a crash of kubelet does: its pods keep
# running, and it asks the apiserver for new service-account tokens (its cache is in memory).
restart_kubelet() {
  [ -f "$run/pids/kubelet" ] || { log "no cluster of scripts/cluster.sh is up"; exit 1; }
  stop_group kubelet
  start_kubelet
  wait_until kubelet 600 kubelet_healthy
  log "kubelet restarted"
}
node_ready() {
  kubectl_ get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' | grep -q True
}

ctr_() {
  ctr --address "$run/containerd/containerd.sock" --namespace k8s.io "$@"
}

# The images pods use, built here with buildah (nothing can be pulled) and imported into the
# cluster's containerd: the pause container (a static program that waits for a signal),
# busybox (Debian's busybox-static), the Secrets Store CSI driver, and keybroker's own image when scripts/build-image.sh has
# made one (target/image/keybroker.oci.tar).
images() {
  local work; work=$(mktemp -d)
  local st=(--storage-driver vfs --root "$run/buildah" --runroot "$run/buildah-run")
  cat > "$work/pause.c" <<'CEOF'
#include <signal.h>
#include <unistd.h>
static void quit(int s) { (void)s; _exit(0); }
int main(void) {
  signal(SIGINT, quit);
  signal(SIGTERM, quit);
  for (;;) pause();
}
CEOF
  gcc -static -Os -o "$work/pause" "$work/pause.c"
  local c
  c=$(buildah "${st[@]}" from scratch)
  buildah "${st[@]}" copy "$c" "$work/pause" /pause >/dev/null
  buildah "${st[@]}" config --entrypoint '["/pause"]' "$c"
  buildah "${st[@]}" commit --quiet "$c" localhost/pause:kb >/dev/null
  buildah "${st[@]}" rm "$c" >/dev/null
  mkdir -p "$work/busybox/bin"
  cp /bin/busybox "$work/busybox/bin/busybox"
  local applet
  for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$work/busybox/bin/$applet"
  done
  c=$(buildah "${st[@]}" from scratch)
  buildah "${st[@]}" copy "$c" "$work/busybox" / >/dev/null
  buildah "${st[@]}" config --cmd '["/bin/sh"]' "$c"
  buildah "${st[@]}" commit --quiet "$c" localhost/busybox:kb >/dev/null
  buildah "${st[@]}" rm "$c" >/dev/null
  # The Secrets Store CSI driver: its command, busybox (the driver runs `mount`/`umount`, as its
  # own image brings util-linux) and the registration stand-in (tests/driver-harness -register).
  local harness; harness=$(cd "$(dirname "$0")/.." && pwd)/.peers/bin/driver-harness
  local images=(pause busybox)
  if [ -x "$cache/bin/secrets-store-csi-$SSCSI_VERSION" ] && [ -x "$harness" ]; then
    c=$(buildah "${st[@]}" from scratch)
    buildah "${st[@]}" copy "$c" "$work/busybox" / >/dev/null
    buildah "${st[@]}" copy "$c" "$cache/bin/secrets-store-csi-$SSCSI_VERSION" /secrets-store-csi >/dev/null
    buildah "${st[@]}" copy "$c" "$harness" /driver-harness >/dev/null
    buildah "${st[@]}" config --entrypoint '["/secrets-store-csi"]' "$c"
    buildah "${st[@]}" commit --quiet "$c" localhost/secrets-store-csi:kb >/dev/null
    buildah "${st[@]}" rm "$c" >/dev/null
    images+=(secrets-store-csi)
  fi
  if [ -x "$cache/bin/provider-azure-$AZURE_PROVIDER_VERSION" ]; then
    c=$(buildah "${st[@]}" from scratch)
    buildah "${st[@]}" copy "$c" "$cache/bin/provider-azure-$AZURE_PROVIDER_VERSION" /provider-azure >/dev/null
    buildah "${st[@]}" config --entrypoint '["/provider-azure"]' "$c"
    buildah "${st[@]}" commit --quiet "$c" localhost/provider-azure:kb >/dev/null
    buildah "${st[@]}" rm "$c" >/dev/null
    images+=(provider-azure)
  fi
  if [ -x "$cache/bin/vault-csi-provider-$VAULT_CSI_PROVIDER_VERSION" ]; then
    c=$(buildah "${st[@]}" from scratch)
    buildah "${st[@]}" copy "$c" "$cache/bin/vault-csi-provider-$VAULT_CSI_PROVIDER_VERSION" /vault-csi-provider >/dev/null
    buildah "${st[@]}" config --entrypoint '["/vault-csi-provider"]' "$c"
    buildah "${st[@]}" commit --quiet "$c" localhost/vault-csi-provider:kb >/dev/null
    buildah "${st[@]}" rm "$c" >/dev/null
    images+=(vault-csi-provider)
  fi
  local img
  for img in "${images[@]}"; do
    buildah "${st[@]}" push --quiet "localhost/$img:kb" "oci-archive:$work/$img.tar:localhost/$img:kb"
    ctr_ images import --snapshotter native "$work/$img.tar" >/dev/null
  done
  # Also under the names deploy/examples/ use (those pods are applied as they are): busybox
  # 1.35 is Debian's 1.35.0, keybroker's image this repository's version.
  ctr_ images tag --force localhost/busybox:kb docker.io/library/busybox:1.35 >/dev/null
  local repo; repo=$(cd "$(dirname "$0")/.." && pwd)
  local kb="$repo/target/image/keybroker.oci.tar"
  if [ -f "$kb" ]; then
    ctr_ images import --snapshotter native "$kb" >/dev/null
    local name version
    # The whole list first: `ctr | grep -m1` fails under pipefail whenever ctr writes a line
    # after grep has left (SIGPIPE), and `set -e` then ends `up` without a word.
    local listed; listed=$(ctr_ images ls -q)
    name=""
    local line
    while IFS= read -r line; do
      if [[ $line == localhost/keybroker:* ]]; then name=$line; break; fi
    done <<< "$listed"
    [ -n "$name" ] || { log "no localhost/keybroker image in $kb"; exit 1; }
    version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml")
    version=${version%%$'\n'*}
    ctr_ images tag --force "$name" "ghcr.io/keybroker/keybroker:$version" >/dev/null
  fi
  rm -rf "$work" "$run/buildah" "$run/buildah-run"
  log "images: $(ctr_ images ls -q | grep -v '^sha256:' | tr '\n' ' ')"
}

up() {
  [ "$(id -u)" = 0 ] || { log "run as root"; exit 1; }
  build
  if [ -d "$run/pids" ] && [ -n "$(ls -A "$run/pids")" ]; then
    log "a cluster is already up ($run): scripts/cluster.sh down first"; exit 1
  fi
  # A machine that already has a kubelet directory may be a real node: never touch it.
  if [ -e "$KUBELET_DIR" ]; then
    log "$KUBELET_DIR exists: is a kubelet running here? (scripts/cluster.sh down removes only what up made)"; exit 1
  fi
  local started; started=$(date +%s.%N)
  mkdir -p "$run"/{pki,log,pids,etcd,containerd/root,containerd/state,cni/net.d,cni/bin} "$KUBELET_DIR"
  touch "$run/made-kubelet-dir"
  # The Secrets Store CSI driver's providers directories (hostPaths of its DaemonSet and of
  # keybroker's provider mode): the outermost missing directory of each is made here and
  # listed, and `down` removes what is listed.
  local p top
  for p in "${PROVIDER_DIRS[@]}"; do
    top=""
    while [ ! -e "$p" ]; do top=$p; p=$(dirname "$p"); done
    if [ -n "$top" ]; then echo "$top" >> "$run/made-dirs"; fi
  done
  for p in "${PROVIDER_DIRS[@]}"; do mkdir -p "$p"; done
  local k
  for k in "${SYSCTLS[@]}"; do
    echo "$k=$(sysctl -n "$k")"
  done > "$run/sysctls"
  ip netns add "$NETNS"
  # The node's address is a second address of the namespace's loopback: nothing leaves it.
  in_ns ip link set lo up
  in_ns ip addr add "$NODE_IP/32" dev lo
  # The `kubernetes` Service (10.96.0.1:443) as kube-proxy would make it, so in-cluster clients
  # (the Secrets Store driver's manager, providers) reach the apiserver: a second loopback
  # address and one DNAT rule, both inside the namespace and gone with it.
  in_ns ip addr add "$SERVICE_IP/32" dev lo
  in_ns iptables -t nat -A OUTPUT -d "$SERVICE_IP" -p tcp --dport 443 -j DNAT --to-destination "$NODE_IP:6443"

  # PKI: a CA, the apiserver's serving certificate, clients, the service-account key pair.
  local d="$run/pki"
  openssl genrsa -out "$d/ca.key" 2048 2>/dev/null
  openssl req -x509 -new -key "$d/ca.key" -subj "/CN=keybroker-test-cluster-ca" -days 2 -out "$d/ca.crt" 2>/dev/null
  cert apiserver kube-apiserver "" "IP:$NODE_IP,IP:127.0.0.1,IP:$SERVICE_IP,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:localhost"
  cert admin admin system:masters
  cert kubelet "system:node:$NODE" system:nodes "IP:$NODE_IP,DNS:$NODE"
  cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
  cert controller-manager system:kube-controller-manager ""
  cert scheduler system:kube-scheduler ""
  openssl genrsa -out "$d/sa.key" 2048 2>/dev/null
  openssl rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
  local n
  for n in admin kubelet controller-manager scheduler; do kubeconfig "$n"; done

  # The cluster's DNS answers every name with the node's address: whatever a pod looks up
  # (vault.vault.svc, login.microsoftonline.com, orders-kv.vault.azure.net) is served there,
  # by OpenBao or the stand-ins the tests start, and no lookup leaves the namespace.
  in_ns ip addr add "$DNS_IP/32" dev lo
  start dnsmasq dnsmasq --keep-in-foreground --log-facility=- --pid-file= --user=nobody \
    --no-resolv --no-hosts --listen-address="$DNS_IP" --bind-interfaces --address="/#/$NODE_IP"
  start etcd etcd --name kb --data-dir "$run/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster kb=http://127.0.0.1:2380

  # containerd: its own root, state and socket; runc; the local pause image; no OOM score
  # changes (root here lacks CAP_SYS_RESOURCE). Pods off the host network get an address of
  # $POD_CIDR on a bridge inside the namespace (Debian's CNI plugins; host-local keeps its
  # leases under $run): they reach the node's address, and so OpenBao, the stand-ins and the
  # apiserver, and nothing outside the namespace.
  local plugin
  for plugin in loopback bridge host-local; do
    ln -sf "/usr/lib/cni/$plugin" "$run/cni/bin/$plugin"
  done
  cat > "$run/cni/net.d/10-kb-pods.conflist" <<CNIEOF
{"cniVersion": "1.0.0", "name": "kb-pods", "plugins": [{
  "type": "bridge", "bridge": "kb-pods0", "isGateway": true, "ipMasq": false,
  "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]],
           "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$run/cni/ipam"}}]}
CNIEOF
  # Pods reach the kubernetes Service through the bridge (PREROUTING), as kube-proxy makes it.
  in_ns iptables -t nat -A PREROUTING -d "$SERVICE_IP" -p tcp --dport 443 -j DNAT --to-destination "$NODE_IP:6443"
  cat > "$run/containerd/config.toml" <<CDEOF
version = 2
root = "$run/containerd/root"
state = "$run/containerd/state"
[grpc]
  address = "$run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/pause:kb"
  restrict_oom_score_adj = true
  # Pods' network namespaces under the state directory (not /run/netns): down unmounts them.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$run/cni/bin"
    conf_dir = "$run/cni/net.d"
CDEOF
  start containerd containerd --config "$run/containerd/config.toml"
  wait_until containerd 120 ctr_ version
  images

  local k8s="$cache/bin"
  start kube-apiserver "$k8s/kube-apiserver" \
    --etcd-servers=http://127.0.0.1:2379 \
    --bind-address="$NODE_IP" --advertise-address="$NODE_IP" --secure-port=6443 \
    --tls-cert-file="$d/apiserver.crt" --tls-private-key-file="$d/apiserver.key" \
    --client-ca-file="$d/ca.crt" \
    --kubelet-client-certificate="$d/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$d/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="$d/ca.crt" \
    --kubelet-preferred-address-types=InternalIP,Hostname \
    --service-account-issuer="https://$NODE_IP:6443" \
    --service-account-key-file="$d/sa.pub" --service-account-signing-key-file="$d/sa.key" \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --service-cluster-ip-range=10.96.0.0/24 --allow-privileged=true
  wait_until kube-apiserver 600 kubectl_ get --raw /readyz
  start kube-controller-manager "$k8s/kube-controller-manager" \
    --kubeconfig="$d/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$d/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$d/controller-manager.kubeconfig" \
    --service-account-private-key-file="$d/sa.key" --root-ca-file="$d/ca.crt" \
    --use-service-account-credentials=true --bind-address=127.0.0.1 \
    --controllers='*,-nodeipam,-service-lb-controller,-cloud-node-lifecycle'
  start kube-scheduler "$k8s/kube-scheduler" \
    --kubeconfig="$d/scheduler.kubeconfig" \
    --authentication-kubeconfig="$d/scheduler.kubeconfig" \
    --authorization-kubeconfig="$d/scheduler.kubeconfig" --bind-address=127.0.0.1

  # The node's resolver is the cluster's DNS too (host-network pods with the Default policy).
  echo "nameserver $DNS_IP" > "$run/resolv.conf"
  cat > "$run/kubelet.yaml" <<KLEOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$run/containerd/containerd.sock
authentication:
  x509: {clientCAFile: "$d/ca.crt"}
  webhook: {enabled: true}
  anonymous: {enabled: false}
authorization: {mode: Webhook}
tlsCertFile: "$d/kubelet.crt"
tlsPrivateKeyFile: "$d/kubelet.key"
address: "$NODE_IP"
healthzBindAddress: 127.0.0.1
failSwapOn: false
# Pods' log directories with the cluster (the node's /var/log/pods would keep those of pods
# that never got deleted when the cluster goes down).
podLogsDir: "$run/pod-logs"
resolvConf: "$run/resolv.conf"
clusterDNS: ["$DNS_IP"]
clusterDomain: cluster.local
registerNode: true
serializeImagePulls: false
# The machine's disk is shared with builds: kubelet's default disk-pressure thresholds (10% /
# 15% free) would evict the test's pods whenever a build fills it. Evict only when truly full.
evictionHard:
  nodefs.available: "512Mi"
  imagefs.available: "512Mi"
  nodefs.inodesFree: "1%"
  imagefs.inodesFree: "1%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
KLEOF
  start_kubelet
  wait_until kubelet 600 node_ready
  local took; took=$(python3 -c "import sys; print(round($(date +%s.%N) - $started, 1))")
  log "node $NODE Ready in ${took} s"
}

# Every pid in the cgroups kubelet made (kubepods), in every hierarchy.
kubepods_pids() {
  find /sys/fs/cgroup -path '*kubepods*' -name cgroup.procs 2>/dev/null | xargs -r cat 2>/dev/null | sort -u
}

stop_group() {
  local n=$1 i
  [ -f "$run/pids/$n" ] || return 0
  local pid; pid=$(cat "$run/pids/$n")
  kill -TERM -- "-$pid" 2>/dev/null || true
  # The apiserver takes about a minute to exit on SIGTERM: a short grace, then KILL.
  for i in $(seq 1 25); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$run/pids/$n"
}

down() {
  [ "$(id -u)" = 0 ] || { log "run as root"; exit 1; }
  # Only what `up` made: without its state directory there is nothing of ours to stop (and
  # the kubepods cgroups, mounts or kubelet directory on this machine are someone else's).
  if [ ! -d "$run" ]; then
    ip netns del "$NETNS" 2>/dev/null || true
    log "down: no cluster of scripts/cluster.sh is up ($run is absent)"
    return 0
  fi
  local i n m
  # kubelet first (it would restart what the rest stops), then every pod process.
  stop_group kubelet
  for i in 1 2 3 4 5; do
    m=$(kubepods_pids)
    [ -z "$m" ] && break
    echo "$m" | xargs -r kill -KILL 2>/dev/null || true
    sleep 0.2
  done
  pkill -KILL -f "containerd-shim-runc-v2 .*-address $run/containerd/containerd.sock" 2>/dev/null || true
  for n in kube-scheduler kube-controller-manager kube-apiserver containerd etcd dnsmasq; do
    stop_group "$n"
  done
  # Mounts kubelet and containerd made (kubelet bind-mounts its root onto itself), deepest first.
  for i in 1 2 3 4; do
    m=$(awk -v a="$KUBELET_DIR" -v b="$run" '$5 == a || index($5, a "/") == 1 || index($5, b "/") == 1 {print $5}' /proc/self/mountinfo | sort -r)
    [ -z "$m" ] && break
    echo "$m" | while read -r mp; do umount -l "$mp" 2>/dev/null || true; done
  done
  # kubelet's cgroups, deepest first.
  find /sys/fs/cgroup -depth -type d -path '*kubepods*' -exec rmdir {} \; 2>/dev/null || true
  if [ -f "$run/sysctls" ]; then
    while IFS='=' read -r k v; do sysctl -qw "$k=$v" || true; done < "$run/sysctls"
  fi
  ip netns del "$NETNS" 2>/dev/null || true
  [ -e "$run/made-kubelet-dir" ] && rm -rf "$KUBELET_DIR"
  if [ -f "$run/made-dirs" ]; then
    while read -r p; do rm -rf "$p"; done < "$run/made-dirs"
  fi
  rm -rf "$run"
  log "down: no cluster process, mount, cgroup or namespace left"
}

case "${1:-}" in
  build) build ;;
  up) up ;;
  down) down ;;
  restart-kubelet) restart_kubelet ;;
  kubectl) shift; kubectl_ "$@" ;;
  helm) shift; KUBECONFIG="$run/pki/admin.kubeconfig" in_ns "$(cd "$(dirname "$0")/.." && pwd)/.peers/bin/helm" "$@" ;;
  *) echo "usage: scripts/cluster.sh build|up|down|restart-kubelet|kubectl ARGS...|helm ARGS..." >&2; exit 2 ;;
esac
