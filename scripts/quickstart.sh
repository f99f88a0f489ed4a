#!/usr/bin/env bash
# The quickstart: mount the example secrets with the embedded local provider, read one, change
# its source, watch the mounted file change, check the audit log, unmount. No cloud account.
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d /tmp/keybroker-quickstart.XXXXXX)
mnt="$work/mnt"
cp -r examples/secrets "$work/secrets"
sed -e "s#path: secrets#path: $work/secrets#" -e "s#/tmp/keybroker-demo-audit.jsonl#$work/audit.jsonl#" \
  examples/quickstart.yaml > "$work/quickstart.yaml"

echo "== building keybroker (release)"
cargo build --release --quiet
bin=target/release/keybroker

echo "== keybroker mount --config $work/quickstart.yaml $mnt"
"$bin" mount --config "$work/quickstart.yaml" "$mnt" 2> "$work/keybroker.log" &
pid=$!
cleanup() { kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 100); do grep -q ': mounted ' "$work/keybroker.log" 2>/dev/null && break; sleep 0.1; done
grep -q ': mounted ' "$work/keybroker.log" || { cat "$work/keybroker.log"; exit 1; }

ls -l "$mnt"
echo "== cat $mnt/database-url"
cat "$mnt/database-url"; echo

echo "== changing the database password at the source"
sed -i 's/quickstart-db-password/rotated-db-password/' "$work/secrets/db"
for _ in $(seq 50); do grep -q rotated "$mnt/database-url" && break; sleep 0.1; done
echo "== cat $mnt/database-url (after rotation)"
cat "$mnt/database-url"; echo

cleanup
trap - EXIT
echo "== audit log ($work/audit.jsonl), last records:"
tail -n 4 "$work/audit.jsonl"
echo "== keybroker audit verify"
"$bin" audit verify "$work/audit.jsonl"
echo "== done; files are in $work"
