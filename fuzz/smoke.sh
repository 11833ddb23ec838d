#!/usr/bin/env bash
# Runs each fuzz target briefly (default 30 s each). Needs cargo-fuzz and a nightly toolchain:
#     cargo install cargo-fuzz && bash fuzz/smoke.sh [seconds]
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_EACH=${1:-30}
for target in client_message position; do
    echo "== fuzzing $target for ${SECONDS_EACH}s"
    cargo +nightly fuzz run "$target" -- -max_total_time="$SECONDS_EACH" -max_len=4096
done
