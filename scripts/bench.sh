#!/usr/bin/env bash
# reservd against Debian's qemu-pr-helper, side by side: builds the release
# binaries and the benchmark (benches/prbench.rs), runs the host part (error
# path, start-up, memory), boots the VM test bed (tests/vm/run-vm.sh) for the
# device part, and prints one Markdown table with both daemons and the ratios.
# The maps part boots the bed twice more, with 2 and with 8 multipath maps
# (RESERVD_VM_MAPS): PR IN on map B while map A's PR commands hang, and PR IN
# throughput through the maps.
#
# Usage: scripts/bench.sh [--host-only | --maps-only] [--no-maps] [--scale F] [--hang-ms MS]
#   --scale F     multiply iteration counts and durations (default 1)
#   --hang-ms MS  how long map A's PR commands are held in the maps part (1000)
# Needs root and /usr/bin/qemu-pr-helper (qemu-system-common); the VM part
# needs what tests/vm/run-vm.sh needs. Not part of scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd -P)

host_only=0
maps=1
maps_only=0
scale=1
hang_ms=1000
while [ $# -gt 0 ]; do
    case $1 in
        --host-only) host_only=1 maps=0 ;;
        --maps-only) maps_only=1 ;;
        --no-maps) maps=0 ;;
        --scale) scale=$2; shift ;;
        --hang-ms) hang_ms=$2; shift ;;
        *) echo "usage: $0 [--host-only | --maps-only] [--no-maps] [--scale F] [--hang-ms MS]" >&2; exit 2 ;;
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

# vm_part NAME VAR=VALUE... -- PRBENCH-ARGS...: one boot of the bed
vm_part() {
    local name=$1 vmout rc=0
    shift
    local envs=()
    while [ "$1" != -- ]; do envs+=("$1"); shift; done
    shift
    echo "== $name (tests/vm/run-vm.sh)" >&2
    vmout=$(mktemp)
    env "${envs[@]}" tests/vm/run-vm.sh "$bench" "$@" >"$vmout" || rc=$?
    if [ "$rc" = 0 ]; then
        grep '^| ' "$vmout" >>"$out"
        grep -v '^| ' "$vmout" >&2 || true
    else
        cat "$vmout" >&2
    fi
    rm -f "$vmout"
    if [ "$rc" != 0 ]; then
        echo "$name failed (exit $rc)" >&2
        exit "$rc"
    fi
}

if [ "$maps_only" = 0 ]; then
    echo "== host part" >&2
    "$bench" host "${args[@]}" >>"$out"
fi

vm_note=""
if [ "$host_only" = 0 ] && [ "$maps_only" = 0 ]; then
    vm_part "VM part" RESERVD_VM_TIMEOUT="${RESERVD_VM_TIMEOUT:-420}" -- guest "${args[@]}"
fi
if [ "$maps" = 1 ]; then
    for n in 2 8; do
        vm_part "maps part, $n maps" RESERVD_VM_MAPS=$n RESERVD_VM_TIMEOUT="${RESERVD_VM_TIMEOUT:-900}" \
            -- maps "${args[@]}" --hang-ms "$hang_ms"
    done
fi
if [ "$host_only" = 0 ]; then
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
