#!/usr/bin/env bash
# Renders the Helm chart (deploy/helm/keybroker) and validates everything in deploy/ against the
# Kubernetes 1.35 OpenAPI schemas, offline and strictly (unknown fields are errors).
# deploy/keybroker.yaml is the rendered chart for kubectl users: it must match a fresh render
# (`scripts/validate-deploy.sh --update` rewrites it).
set -euo pipefail
cd "$(dirname "$0")/.."
helm=.peers/bin/helm
kv=.peers/venv/bin/kubernetes-validate
for tool in "$helm" "$kv"; do
  [ -x "$tool" ] || { echo "$tool is missing: run scripts/install-peers.sh" >&2; exit 1; }
done
render=$(mktemp)
trap 'rm -f "$render"' EXIT
"$helm" lint --strict --kube-version 1.35.0 deploy/helm/keybroker --set-file bindings=deploy/examples/bindings.yaml >/dev/null
"$helm" template keybroker deploy/helm/keybroker --namespace kube-system \
  --kube-version 1.35.0 --set-file bindings=deploy/examples/bindings.yaml > "$render"
if [ "${1:-}" = "--update" ]; then
  cp "$render" deploy/keybroker.yaml
fi
if ! diff -u deploy/keybroker.yaml "$render"; then
  echo "deploy/keybroker.yaml differs from the chart: run scripts/validate-deploy.sh --update" >&2
  exit 1
fi
"$kv" --strict --kubernetes-version 1.35.0 "$render" deploy/examples/pod.yaml deploy/examples/pod-vault.yaml deploy/examples/pod-azure.yaml \
  deploy/examples/pod-sidecar-vault.yaml deploy/examples/pod-init-azure.yaml
# The chart's options for users' own volumes and annotations render valid manifests.
dev_render=$(mktemp)
trap 'rm -f "$render" "$dev_render"' EXIT
"$helm" template keybroker deploy/helm/keybroker --namespace kube-system -f deploy/examples/values-dev.yaml \
  --kube-version 1.35.0 --set-file bindings=deploy/examples/bindings.yaml > "$dev_render"
grep -q "keybroker.io/rollout" "$dev_render" || { echo "podAnnotations are not rendered" >&2; exit 1; }
grep -q "mountPath: /var/lib/keybroker-dev-secrets" "$dev_render" || { echo "extraVolumeMounts are not rendered" >&2; exit 1; }
"$kv" --strict --kubernetes-version 1.35.0 "$dev_render"
# The provider mode (behind an installed Secrets Store CSI driver) renders and validates too.
provider_render=$(mktemp)
trap 'rm -f "$render" "$dev_render" "$provider_render"' EXIT
"$helm" lint --strict --kube-version 1.35.0 deploy/helm/keybroker --set mode=provider --set-file bindings=deploy/examples/bindings.yaml >/dev/null
"$helm" template keybroker deploy/helm/keybroker --namespace kube-system --set mode=provider \
  --kube-version 1.35.0 --set-file bindings=deploy/examples/bindings.yaml > "$provider_render"
grep -q "kind: CSIDriver" "$provider_render" && { echo "provider mode must not register a CSIDriver" >&2; exit 1; }
grep -q "name: keybroker-provider" "$provider_render" || { echo "provider mode renders no provider DaemonSet" >&2; exit 1; }
"$kv" --strict --kubernetes-version 1.35.0 "$provider_render"
# The bindings the chart ships must be valid keybroker bindings.
cargo run --quiet --locked -- check --bindings deploy/examples/bindings.yaml
echo "deploy/: chart renders, manifests valid for Kubernetes 1.35, bindings valid"
