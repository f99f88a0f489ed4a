#!/usr/bin/env bash
# Runs benches of this checkout and of an older revision alternately, in one run, so that a
# change that should not change performance (a refactor) can be shown not to:
#
#   scripts/bench-compare.sh REV [ROUNDS] BENCH...     (as root; e.g. HEAD~1 2 node_publish)
#
# The older revision is built in a git worktree under $TMPDIR with its own target directory
# (both kept for the next run; `git worktree remove $TMPDIR/keybroker-bench-base` ends them).
# Each bench prints its own ratios against the baseline it measures in the same process (a
# plain tmpfs file, kubelet's Secret volume): compare those ratios between the two builds,
# since the machine's speed drifts between rounds (the order of the two builds alternates by
# round for the same reason). Output: target/bench-compare/<bench>.<build>.<round>.txt
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: scripts/bench-compare.sh REV [ROUNDS] BENCH..." >&2; exit 2; }
rev=$1; shift
rounds=2
if [[ $1 =~ ^[0-9]+$ ]]; then rounds=$1; shift; fi
benches=("$@")
base="${TMPDIR:-/tmp}/keybroker-bench-base"
# A worktree of REV left by an earlier run is reused (its build is too); any other is replaced.
if [ "$(git -C "$base" rev-parse HEAD 2>/dev/null)" != "$(git rev-parse "$rev^{commit}")" ]; then
  git worktree remove --force "$base" >/dev/null 2>&1 || rm -rf "$base"
  git worktree prune
  git worktree add --detach -f "$base" "$rev" >/dev/null
fi
args=()
for b in "${benches[@]}"; do args+=(--bench "$b"); done
bin_of() { # the bench executables cargo built, by bench name
  (cd "$1" && CARGO_TARGET_DIR="$2" cargo bench --locked --no-run "${args[@]}" --message-format=json 2>/dev/null) |
    python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and "bench" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])'
}
echo "building $rev and this checkout"
declare -A old new
while read -r n e; do old[$n]=$e; done < <(bin_of "$base" "${BENCH_BASE_TARGET:-${TMPDIR:-/tmp}/keybroker-bench-base-target}")
while read -r n e; do new[$n]=$e; done < <(bin_of . "$PWD/target")
out=target/bench-compare
mkdir -p "$out"
for r in $(seq 1 "$rounds"); do
  for b in "${benches[@]}"; do
    # The order alternates by round, so a drift of the machine favours neither build.
    order="base new"; [ $((r % 2)) -eq 0 ] && order="new base"
    for build in $order; do
      if [ $build = base ]; then exe=${old[$b]}; else exe=${new[$b]}; fi
      echo "== round $r: $b ($build: $([ $build = base ] && echo "$rev" || git rev-parse --short HEAD))"
      "$exe" --bench | tee "$out/$b.$build.$r.txt"
    done
  done
done
