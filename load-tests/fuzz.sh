#!/usr/bin/env bash
# Bounded fuzzing of the validator, the COPY encoder, the HTTP JSON
# parser and the tracking apps' parsers, OsmAnd and OwnTracks (targets in
# fuzz/, corpus in fuzz/corpus/, kept in the repo).
#   load-tests/fuzz.sh [SECONDS_PER_TARGET]   (default 60)
# New inputs go to fuzz/target/new-corpus/<target>, so a run (CI's included)
# leaves the checkout as it was; with FUZZ_KEEP=1 those that add coverage
# are then merged into the kept corpus.
# Needs the nightly toolchain; installs cargo-fuzz if it is missing. A crash
# leaves its input in fuzz/artifacts/<target>/ and fails the script; replay
# it with `cargo +nightly fuzz run <target> <file>`.
set -euo pipefail
secs="${1:-60}"
cd "$(dirname "$0")/../fuzz"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
for target in validate copy_encoder http_json osmand owntracks; do
  mkdir -p "corpus/$target"
  echo "== fuzz $target for ${secs}s"
  log="target/fuzz-$target.log"
  mkdir -p target
  status=0
  new="target/new-corpus/$target"
  mkdir -p "$new"
  cargo +nightly fuzz run -O "$target" "$new" "corpus/$target" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 >"$log" 2>&1 || status=$?
  grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|INFO: Done)|ERROR|panicked|SUMMARY|deadly signal' "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -40 "$log" >&2
    echo "fuzz $target failed (exit $status): see fuzz/artifacts/$target/ and $PWD/$log" >&2
    exit 1
  fi
  if [ "${FUZZ_KEEP:-0}" = 1 ]; then
    cargo +nightly fuzz run -O "$target" "corpus/$target" "$new" -- -merge=1 >>"$log" 2>&1
    echo "   kept corpus: $(ls "corpus/$target" | wc -l) inputs"
  fi
done
