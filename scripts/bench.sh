#!/usr/bin/env bash
# reservd against Debian's qemu-pr-helper, side by side: builds the release
# binaries and the benchmark (benches/prbench.rs), runs the host part (error
# path, start-up, memory), boots the VM test bed (tests/vm/run-vm.sh) for the
# device part, and prints one Markdown table with both daemons and the ratios.
#
# Usage: scripts/bench.sh [--host-only] [--scale F]
#   --scale F   multiply iteration counts and durations (default 1)
# Needs root and /usr/bin/qemu-pr-helper (qemu-system-common); the VM part
# needs what tests/vm/run-vm.sh needs. Not part of scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd -P)

host_only=0
scale=1
while [ $# -gt 0 ]; do
    case $1 in
        --host-only) host_only=1 ;;
        --scale) scale=$2; shift ;;
        *) echo "usage: $0 [--host-only] [--scale F]" >&2; exit 2 ;;
    esac
    shift
done

qemu=${QEMU_PR_HELPER:-/usr/bin/qemu-pr-helper}
[ -x "$qemu" ] || { echo "$qemu missing (apt-get install qemu-system-common)" >&2; exit 2; }

echo "== building (release)" >&2
cargo build --release --bin reservd >&2
bench=$(cargo bench --no-run --bench prbench 2>&1 | tee /dev/stderr |
    sed -n 's/.*Executable.*(\(.*prbench-[0-9a-f]*\)).*/\1/p' | tail -1)
[ -n "$bench" ] || { echo "cannot find the prbench binary" >&2; exit 2; }
bench=$root/$bench
reservd=$root/target/release/reservd
args=(--reservd "$reservd" --qemu "$qemu" --scale "$scale")

out=$(mktemp)
trap 'rm -f "$out"' EXIT

echo "== host part" >&2
"$bench" host "${args[@]}" >>"$out"

vm_note=""
if [ "$host_only" = 0 ]; then
    echo "== VM part (tests/vm/run-vm.sh)" >&2
    vmout=$(mktemp)
    if RESERVD_VM_TIMEOUT=${RESERVD_VM_TIMEOUT:-420} \
        tests/vm/run-vm.sh "$bench" guest "${args[@]}" >"$vmout"; then
        grep '^| ' "$vmout" >>"$out"
        grep -v '^| ' "$vmout" >&2 || true
    else
        rc=$?
        cat "$vmout" >&2
        rm -f "$vmout"
        echo "VM part failed (exit $rc)" >&2
        exit "$rc"
    fi
    rm -f "$vmout"
    vm_note=" VM rows: QEMU TCG guest (no KVM, 2 vCPUs emulated on these cores), LIO/tcm_loop disks; device latencies there are slow and noisy, compare the ratios, not the absolute figures."
fi

cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
echo
echo "Machine: $(nproc) CPUs, ${cpu:-unknown CPU}, Linux $(uname -r), $(date -u +%Y-%m-%d)."
echo "qemu-pr-helper: $qemu ($(dpkg-query -W -f '${Version}' qemu-system-common 2>/dev/null || echo unknown)); reservd $(git rev-parse --short HEAD 2>/dev/null || echo unknown).$vm_note"
echo "Ratio = reservd / qemu-pr-helper (below 1: reservd is faster or smaller; for throughput above 1 is better)."
echo
echo "| where | figure | reservd | qemu-pr-helper | ratio |"
echo "|---|---|---|---|---|"
cat "$out"
