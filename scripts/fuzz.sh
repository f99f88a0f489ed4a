#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for a fixed time each with libFuzzer, starting
# from its seed corpus (fuzz/corpus/<target>). A crash, a timeout (a single input slower than
# FUZZ_TIMEOUT seconds), a run over FUZZ_RSS_MB of memory (libFuzzer with ASan takes ~250 MiB
# itself) or one allocation over FUZZ_MALLOC_MB is a finding and
# fails the run; the input is left in fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh             # 30 s per target (what CI runs)
#   scripts/fuzz.sh 600         # 10 minutes per target
#   scripts/fuzz.sh 600 templates audit_reader
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH="${1:-30}"
shift || true
FUZZ_TIMEOUT="${FUZZ_TIMEOUT:-2}"
FUZZ_RSS_MB="${FUZZ_RSS_MB:-1024}"
FUZZ_MALLOC_MB="${FUZZ_MALLOC_MB:-512}"
export PATH="$PWD/.peers/bin:$PATH"
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz is missing: run scripts/install-peers.sh" >&2; exit 1; }
rustup run nightly rustc --version >/dev/null || { echo "the nightly toolchain is missing (rustup toolchain install nightly)" >&2; exit 1; }
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(ls fuzz/fuzz_targets | sed 's/\.rs$//')
fi
cargo +nightly fuzz build --fuzz-dir fuzz -O
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  echo "== fuzz $t for ${SECONDS_EACH}s"
  # New corpus entries go to a scratch directory: the committed seeds stay as they are.
  if ! cargo +nightly fuzz run --fuzz-dir fuzz -O "$t" "$work" "fuzz/corpus/$t" -- \
      -max_total_time="$SECONDS_EACH" -timeout="$FUZZ_TIMEOUT" -rss_limit_mb="$FUZZ_RSS_MB" \
      -malloc_limit_mb="$FUZZ_MALLOC_MB" -max_len=300000 -print_final_stats=1 \
      -artifact_prefix="fuzz/artifacts/$t/" 2>"$work/log"; then
    tail -n 40 "$work/log" >&2
    echo "fuzz target $t found a problem: see fuzz/artifacts/$t/" >&2
    exit 1
  fi
  grep -E '^stat::(number_of_executed_units|peak_rss_mb)' "$work/log" | tr '\n' ' '; echo
  rm -rf "$work"
  trap - EXIT
done
echo "fuzzing: ${#targets[@]} targets, ${SECONDS_EACH}s each, no findings"
