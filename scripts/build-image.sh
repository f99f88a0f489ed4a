#!/usr/bin/env bash
# Builds keybroker's container image offline with buildah (vfs storage), exports it as an OCI
# archive (target/image/keybroker.oci.tar) and checks it with podman: `--version`, then an
# `init` against a local provider inside the image, as a non-root user with a read-only root.
#   scripts/build-image.sh            # build + check
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in buildah podman; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: run scripts/install-peers.sh --image" >&2; exit 1; }
done
TAG="localhost/keybroker:$(git rev-parse --short HEAD 2>/dev/null || echo dev)"
STORAGE=(--storage-driver vfs)
# runc: this machine's cgroups are hybrid (v1 + unified), which crun refuses. The limits are
# given explicitly because podman's defaults exceed what an unprivileged runtime may set here.
RUN=(--runtime runc run --rm --read-only --network none --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
out=target/image
work=$(mktemp -d)
cleanup() {
  rm -rf "$work"
  [ -n "${KEEP_IMAGE:-}" ] || podman "${STORAGE[@]}" rmi -f "$TAG" >/dev/null 2>&1 || true
}
trap cleanup EXIT

cargo build --release --locked --quiet
root="$work/rootfs"
mkdir -p "$root/lib64" "$root/lib/x86_64-linux-gnu" "$root/etc" "$root/tmp"
objcopy --strip-debug target/release/keybroker "$root/keybroker"
# Exactly the libraries the binary links, from this build machine.
for lib in $(ldd target/release/keybroker | awk '/=>/ {print $3} /ld-linux/ {print $1}'); do
  cp -L "$lib" "$root$lib"
done
printf 'root:x:0:0:root:/:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/:/sbin/nologin\n' > "$root/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$root/etc/group"
chmod 1777 "$root/tmp"
cp deploy/image/Containerfile "$work/"
buildah "${STORAGE[@]}" bud --quiet --layers=false -f "$work/Containerfile" -t "$TAG" "$work" >/dev/null
mkdir -p "$out"
rm -f "$out/keybroker.oci.tar"
buildah "${STORAGE[@]}" push --quiet "$TAG" "oci-archive:$out/keybroker.oci.tar:$TAG"

# Check: the image runs, as the non-root user, read-only, without network.
version=$(podman "${STORAGE[@]}" "${RUN[@]}" "$TAG" --version)
echo "image runs: $version"
check="$work/check"
mkdir -p "$check/secrets" "$check/out"
printf '{"password":"image-check-value"}' > "$check/secrets/db"
printf 'provider: {local: {path: /check/secrets}}\naudit: {path: /out/audit.jsonl}\nfiles:\n  - {name: password, object: db, key: password}\n' > "$check/config.yaml"
chown -R 65532:65532 "$check"
podman "${STORAGE[@]}" "${RUN[@]}" \
  -v "$check:/check:ro" -v "$check/out:/out" \
  "$TAG" init --config /check/config.yaml --dir /out/secrets
got=$(cat "$check/out/secrets/password")
[ "$got" = "image-check-value" ] || { echo "init inside the image wrote '$got'" >&2; exit 1; }
size=$(podman "${STORAGE[@]}" image inspect "$TAG" --format '{{.Size}}')
echo "image check passed: init wrote the file; image size $((size / 1024 / 1024)) MiB ($size bytes), archive $(du -h "$out/keybroker.oci.tar" | cut -f1)"
