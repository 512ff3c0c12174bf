#!/usr/bin/env bash
# The fault suite, in one command: every locus-faults case, then each fuzz
# target for a bounded time. README "Faults" says what each case does and
# what it found.
#   load-tests/suite.sh           full length (about 45 min with the 30-min soak, then 5 min a fuzz target)
#   load-tests/suite.sh --quick   short versions (what .ci/test runs)
# DATABASE_URL: a PostgreSQL where the suite may create and drop databases.
set -euo pipefail
cd "$(dirname "$0")/.."
# Release, also for --quick: the overload case measures throughput, and a
# debug build spends on refusing calls what it should spend on writing.
cargo build --release --workspace --bins
if [ "${1:-}" = "--quick" ]; then
  ./target/release/locus-faults --quick
  load-tests/fuzz.sh 15
else
  ./target/release/locus-faults --cases crash,outage,slow,overload,hostile,amplify,connections,nats,kill-instance,log-outage,log-nats-kill,log-kill-instance,log-dead-letter,soak
  load-tests/fuzz.sh 300
fi
