#!/bin/sh
# Coverage-guided fuzzing of reservd with libFuzzer, on the stable compiler.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Runs each target (default: all) for SECONDS (default 60) and prints, per
# target, the executions done and the crashes found. Inputs that crash are
# kept in fuzz/artifacts/TARGET/; turn each into a regression file under
# fuzz/regressions/TARGET/ once fixed (tests/fuzz_corpus.rs replays them).
# With FUZZ_MERGE=1 the inputs that add coverage are merged into the small
# seed corpora in fuzz/corpus/TARGET/.
#
# No nightly compiler: libfuzzer-sys links libFuzzer (built from C++ by its
# build script), and the instrumentation is rustc's stable SanitizerCoverage
# pass (-C passes=sancov-module with LLVM options), as cargo-fuzz itself
# uses. Building with an explicit --target keeps these flags off build
# scripts and proc macros. No AddressSanitizer (that needs -Z): the code is
# safe Rust apart from FFI and fd passing, and panics, aborts, hangs
# (-timeout) and memory blow-ups (-rss_limit_mb) are what is caught.
set -eu

secs=${1:-60}
[ $# -gt 0 ] && shift
targets=${*:-wire cdb params mpath_xlate prin server}

root=$(cd "$(dirname "$0")/.." && pwd)
fuzz="$root/fuzz"
triple=$(rustc -vV | sed -n 's/^host: //p')

RUSTFLAGS="-Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
--cfg fuzzing -Cdebug-assertions -Coverflow-checks"
export RUSTFLAGS

echo "building fuzz targets ($triple)..." >&2
cargo build --manifest-path "$fuzz/Cargo.toml" --release --target "$triple" \
    --target-dir "$fuzz/target" --bins >&2
bin="$fuzz/target/$triple/release"

work=$(mktemp -d /tmp/reservd-fuzz-XXXXXX)
trap 'rm -rf "$work"' EXIT INT TERM

total_crashes=0
printf '%-12s %10s %8s %10s %8s %s\n' target execs secs exec/s crashes coverage
for t in $targets; do
    seeds="$fuzz/corpus/$t"
    art="$fuzz/artifacts/$t"
    mkdir -p "$seeds" "$art" "$work/$t"
    log="$work/$t.log"
    # -fork would go on after a crash, but runs are short: stop at the first.
    "$bin/$t" "$work/$t" "$seeds" \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=8400 \
        -artifact_prefix="$art/" -print_final_stats=1 >"$log" 2>&1 || true
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    took=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
    crashes=$(grep -c 'Test unit written to' "$log" || true)
    execs=${execs:-0}
    took=${took:-$secs}
    rate=$(( execs / (took > 0 ? took : 1) ))
    printf '%-12s %10s %8s %10s %8s %s\n' "$t" "$execs" "$took" "$rate" "$crashes" "${cov:-?}"
    if [ "$crashes" -gt 0 ]; then
        grep -E 'panicked|ERROR|SUMMARY' "$log" | head -5 >&2
        total_crashes=$((total_crashes + crashes))
    fi
    if [ "${FUZZ_MERGE:-0}" = 1 ]; then
        "$bin/$t" -merge=1 "$seeds" "$work/$t" >/dev/null 2>&1 || true
    fi
done
echo "crashes: $total_crashes"
[ "$total_crashes" -eq 0 ]
