#!/usr/bin/env bash
# Run every fuzz target for a bounded time, one after another (a 2-core machine runs
# one at a time best). Not part of CI: `make fuzz`, or `FUZZ_SECONDS=600 fuzz/run.sh`.
#
# Needs the nightly toolchain (rustup) and cargo-fuzz (installed here if missing).
# New corpus entries land in fuzz/corpus/<target>/ (commit the ones worth keeping,
# minimized with `cargo +nightly fuzz cmin <target>`); a crash stops the run and
# leaves its input in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")"

SECONDS_EACH="${FUZZ_SECONDS:-60}"
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
  TARGETS=(envelope headers sse resources_yaml snapshot)
fi

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cargo +nightly fuzz build --release

for t in "${TARGETS[@]}"; do
  # New inputs go to the scratch corpus; the kept corpus (fuzz/corpus/<t>) seeds the
  # run and afterwards takes only the inputs that add coverage (libFuzzer's merge).
  work="target/corpus/$t"
  mkdir -p "corpus/$t" "$work"
  log="target/fuzz-$t.log"
  echo "== $t: ${SECONDS_EACH}s"
  if ! cargo +nightly fuzz run --release "$t" "$work" "corpus/$t" -- \
      -max_total_time="$SECONDS_EACH" -max_len=65536 -rss_limit_mb=2048 \
      -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "== $t: FAILED (input in fuzz/artifacts/$t/)" >&2
    exit 1
  fi
  execs=$(grep -m1 '^stat::number_of_executed_units' "$log" | awk '{print $2}')
  cargo +nightly fuzz run --release "$t" "corpus/$t" "$work" -- -merge=1 \
    -max_len=65536 -rss_limit_mb=2048 >"target/merge-$t.log" 2>&1
  echo "== $t: ok, ${execs:-?} executions, kept corpus $(ls "corpus/$t" | wc -l) files"
done
