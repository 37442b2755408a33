#!/usr/bin/env bash
# Fuzzes every target in fuzz/ for SECONDS each (default 60), starting from the checked-in
# corpus. New inputs go to a scratch directory (the corpus only changes by hand, see
# docs/fuzzing.md); a crash stops the run and leaves its input in fuzz/artifacts/<target>/.
# Skipped, with a note, where the nightly toolchain is missing.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-60}"

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "fuzz: no nightly toolchain, skipped"
    exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

cargo +nightly fuzz build
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for target in $(cargo +nightly fuzz list); do
    echo "fuzz: $target for ${seconds}s"
    mkdir -p "$scratch/$target"
    log="$scratch/$target.log"
    # -timeout: one input taking this long is a hang; -rss_limit_mb: growth is a finding.
    if ! cargo +nightly fuzz run "$target" "$scratch/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1; then
        tail -n 80 "$log"
        echo "fuzz: $target failed; the input is in fuzz/artifacts/$target/" >&2
        exit 1
    fi
    grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' "$log"
done
