#!/usr/bin/env bash
# Run every fuzz target (or the ones named) for a bounded time, one after another: a
# 2-core machine runs one at a time best. Not part of CI: `make fuzz`, or
# `FUZZ_SECONDS=600 fuzz/run.sh sse`. Needs the nightly toolchain (rustup); installs
# cargo-fuzz if it is missing.
#
# fuzz/corpus/<target>/ holds the committed seeds (hand-written inputs and the inputs
# of past findings) and is only read. What a run discovers goes to
# fuzz/target/corpus/<target>/ (not committed), which the next run starts from too.
# A crash, timeout or out-of-memory stops the run with exit status 1 and leaves the
# input in fuzz/artifacts/<target>/; once fixed, copy it into fuzz/corpus/<target>/.
set -euo pipefail
cd "$(dirname "$0")"

SECONDS_EACH="${FUZZ_SECONDS:-60}"
ALL=(envelope headers sse resources_yaml snapshot uri values spiffe tokens trace_meta pin_items)
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
  TARGETS=("${ALL[@]}")
fi

# Longest input, every target: request bodies, header blocks, list responses, resource
# files and snapshots are far smaller in practice; 64 KiB leaves room to find slow paths.
MAX_LEN="${FUZZ_MAX_LEN:-65536}"

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cargo +nightly fuzz build --release

summary=()
for t in "${TARGETS[@]}"; do
  work="target/corpus/$t"
  log="target/fuzz-$t.log"
  mkdir -p "$work" "artifacts/$t"
  echo "== $t: ${SECONDS_EACH}s"
  # -timeout: one input taking over 10 s is a finding (a hang or a quadratic path).
  if ! cargo +nightly fuzz run --release "$t" "$work" "corpus/$t" -- \
      -max_total_time="$SECONDS_EACH" -max_len="$MAX_LEN" -rss_limit_mb=2048 \
      -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "== $t: FAILED; the input is in fuzz/artifacts/$t/ (log: fuzz/$log)" >&2
    exit 1
  fi
  execs=$(awk '/^stat::number_of_executed_units/ {print $2}' "$log")
  rate=$(awk '/^stat::average_exec_per_sec/ {print $2}' "$log")
  slowest=$(awk '/^stat::slowest_unit_time_sec/ {print $2}' "$log")
  line="$t: ok, ${SECONDS_EACH}s, ${execs:-?} executions (${rate:-?}/s), slowest input ${slowest:-?}s, corpus $(ls "$work" | wc -l) found + $(ls "corpus/$t" | wc -l) seeds"
  summary+=("$line")
  echo "== $line"
done
echo
echo "fuzz summary"
printf '  %s\n' "${summary[@]}"
