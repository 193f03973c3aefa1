#!/bin/bash
# libiscsi's persistent reservation suites (iscsi-test-cu SCSI.Prin*,
# SCSI.Prout*) through reservd, as a guest's would go through QEMU: the
# reservd-prshim LD_PRELOAD library sends every PERSISTENT RESERVE IN/OUT
# the tool issues with SG_IO to reservd's socket (CDB, fd, parameter list)
# and hands the tool reservd's answer; its other commands go to the device.
#
# Three runs, each on a LU reset first (no registrations, no reservation,
# multipathd holds no key for the map):
#   direct   the single-path disk, no reservd (the control)
#   sp       the single-path disk through reservd (SG_IO backend)
#   map      the dm-multipath map through reservd (libmpathpersist)
# Every test must end the same way (pass, fail or skip) in the three runs.
# A guest cannot tell a map from a single-path LU, so a test that passes
# on the single-path disk and fails on the map is reservd's to fix.
#
# Runs inside the test VM: tests/vm/run-vm.sh tests/vm/scenarios/libiscsi.sh
# (needs target/debug/reservd and target/debug/libreservd_prshim.so:
# cargo build -p reservd -p reservd-prshim; iscsi-test-cu from libiscsi-bin).
set -euo pipefail

: "${RESERVD_MP_DEV:?not inside the reservd test VM}"
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
RESERVD=${RESERVD_BIN:-$ROOT/target/debug/reservd}
SHIM=${RESERVD_PRSHIM:-$ROOT/target/debug/libreservd_prshim.so}
TESTS=${RESERVD_LIBISCSI_TESTS:-SCSI.Prin*,SCSI.Prout*}
read -r -a PATHS <<<"$RESERVD_MP_PATHS"
MP=$RESERVD_MP_DEV ALIAS=$RESERVD_MP_ALIAS SP=$RESERVD_SP_DEV
WORK=$(mktemp -d /tmp/reservd-libiscsi.XXXXXX)
LOGS=${RESERVD_VM_LOGDIR:-$WORK}
SOCK=$WORK/reservd.sock
LOG=$LOGS/libiscsi-reservd.log
RESET_KEY=0x7e5e7
PID=

die() { echo "FAIL: $*" >&2; exit 1; }
T0=${EPOCHREALTIME/./}
step() {
    local us=$(( ${EPOCHREALTIME/./} - T0 ))
    printf '\n=== [+%d.%01ds] %s\n' $((us / 1000000)) $(( (us % 1000000) / 100000 )) "$*"
}
cleanup() { [[ -n $PID ]] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true; }
trap cleanup EXIT

command -v iscsi-test-cu >/dev/null || die "iscsi-test-cu not found (Debian package libiscsi-bin; scripts/deps.sh test installs it)"
[[ -x $RESERVD ]] || die "$RESERVD missing: cargo build"
[[ -r $SHIM ]] || die "$SHIM missing: cargo build -p reservd-prshim"
echo "libiscsi-bin $(dpkg-query -W -f='${Version}' libiscsi-bin 2>/dev/null || echo '?'), multipath-tools $(dpkg-query -W -f='${Version}' multipath-tools 2>/dev/null || echo '?')"
echo "map $MP ($ALIAS over ${PATHS[*]}), single-path disk $SP; tests $TESTS"

# sg DEV ARGS...: sg_persist, repeated while the device reports a UNIT
# ATTENTION (a CLEAR from another nexus leaves one); prints its output
sg() {
    local dev=$1 out i rc
    shift
    for i in 1 2 3 4; do
        rc=0
        out=$(sg_persist -n "$@" "$dev" 2>&1) || rc=$?
        ((rc == 6)) || break
    done
    printf '%s\n' "$out"
    return "$rc"
}
# reset_lu DEV [OTHER_PATHS...]: leave the LU behind DEV with no
# registration and no reservation (REGISTER AND IGNORE, then CLEAR, from
# DEV's nexus), and the unit attention that CLEAR leaves on the other
# nexuses consumed, so that the tool's first command meets none
reset_lu() {
    local dev=$1 p i out
    sg "$dev" --out --register-ignore --param-sark=$RESET_KEY >/dev/null || die "REGISTER AND IGNORE on $dev failed"
    sg "$dev" --out --clear --param-rk=$RESET_KEY >/dev/null || die "CLEAR on $dev failed"
    for p in "$@"; do
        for i in 1 2 3 4; do sg_turs "$p" >/dev/null 2>&1 && break; done
    done
    out=$(sg "$dev" --in --read-keys) || die "READ KEYS on $dev failed"
    [[ $out == *'there are NO registered reservation keys'* ]] || die "$dev still lists keys after CLEAR: $out"
}
# reset_map: the LU as reset_lu leaves it, and no key stored by multipathd
# (reservation_key file: a key the guest registers is stored and
# registered again on paths that come back)
reset_map() {
    local out
    reset_lu "${PATHS[0]}" "${PATHS[@]:1}"
    out=$(multipathd unsetprkey map "$ALIAS" 2>&1)
    [[ $out == ok ]] || die "multipathd unsetprkey map $ALIAS: $out"
    out=$(multipathd unsetprstatus map "$ALIAS" 2>&1) || true
    echo "  multipathd: unsetprkey ok, unsetprstatus $out, key now $(multipathd getprkey map "$ALIAS" 2>&1)"
}

# results LOG: "Suite.Test pass|fail|skip" per test, from CUnit's verbose
# output. A test's result is the word "passed" or "FAILED" that follows its
# "Test: NAME ..." (right after the dots, or at the start of a line: the
# tool's own lines start with spaces). libiscsi marks a test it cannot run
# with a "[SKIPPED] ..." line and CU_PASS: such a pass is a skip.
results() {
    awk '
        function done(r) { printf "%s.%s %s\n", suite, test, r; test = "" }
        function look(s) {
            if (s ~ /\[SKIPPED\]/) skipped = 1
            if (s ~ /^passed/) done(skipped ? "skip" : "pass")
            else if (s ~ /^FAILED/) done("fail")
        }
        /^Suite: / { suite = $2; test = ""; next }
        /^  Test: / {
            test = $2; skipped = 0
            rest = $0; sub(/^  Test: [^ ]+ \.\.\./, "", rest)
            look(rest); next
        }
        test != "" { look($0) }
    ' "$1"
}
# section LOG TEST: the tool's lines for one test (Suite.Test), up to the
# next test
section() {
    awk -v want="$2" '
        /^Suite: |^Run Summary/ { on = 0 }
        /^Suite: / { suite = $2 }
        /^  Test: / { on = (suite "." $2 == want) }
        on { print "    | " $0 }
    ' "$1"
}

# answers: trace lines that differ only in their service action, once,
# with a count and the service actions
answers() {
    awk '
        {
            sa = "-"; key = $0
            if (match($0, /sa=0x[0-9a-f]+/)) {
                sa = substr($0, RSTART + 3, RLENGTH - 3)
                key = substr($0, 1, RSTART + 2) "@" substr($0, RSTART + RLENGTH)
            }
            if (!(key in n)) order[++k] = key
            sas[key] = n[key]++ < 4 ? sas[key] (n[key] > 1 ? "," : "") sa : sas[key]
            last[key] = sa
        }
        END {
            for (i = 1; i <= k; i++) {
                key = order[i]; list = sas[key]; count = n[key]
                if (count > 4) list = list ",...," last[key]
                sub(/@/, list, key)
                printf "    %3d x %s\n", count, key
            }
        }
    '
}

# run NAME DEV [shim]: iscsi-test-cu on DEV, through reservd with "shim"
run() {
    local name=$1 dev=$2 how=${3:-} out=$LOGS/libiscsi-$1.log trace=$LOGS/libiscsi-$1.trace rc=0 t
    local env=()
    if [[ $how == shim ]]; then
        : >"$trace"
        env=(RESERVD_PRSHIM_SOCKET="$SOCK" RESERVD_PRSHIM_TRACE="$trace" LD_PRELOAD="$SHIM")
    fi
    t=${EPOCHREALTIME/./}
    env "${env[@]}" iscsi-test-cu --dataloss --Verbose-scsi --test="$TESTS" "$dev" >"$out" 2>&1 || rc=$?
    t=$(( (${EPOCHREALTIME/./} - t) / 1000 ))
    grep -q '^Run Summary:' "$out" || { sed 's/^/  | /' "$out" | tail -40; die "iscsi-test-cu on $dev did not run its tests (exit $rc)"; }
    results "$out" >"$WORK/$name.res"
    echo "  iscsi-test-cu on $dev${how:+ through reservd}: exit $rc, $(grep -c . "$WORK/$name.res") tests, ${t} ms;" \
        "pass $(grep -c ' pass$' "$WORK/$name.res" || true), fail $(grep -c ' fail$' "$WORK/$name.res" || true)," \
        "skip $(grep -c ' skip$' "$WORK/$name.res" || true)"
    if [[ $how == shim ]]; then
        # The library must have sent PR IN and PR OUT to reservd, and every
        # one of them must have had an answer.
        local nin nout
        nin=$(grep -c '^PR IN ' "$trace" || true) nout=$(grep -c '^PR OUT ' "$trace" || true)
        echo "  through reservd: $nin PR IN, $nout PR OUT; answers other than GOOD:"
        { grep -v -e '-> status 0x00' "$trace" || true; } | answers
        ((nin > 0 && nout > 0)) || die "no PR command went through reservd (is $SHIM preloaded?)"
        ! grep -q 'no answer' "$trace" || die "reservd-prshim could not reach reservd: $(grep -m1 'no answer' "$trace")"
    fi
}

step "reservd starts"
"$RESERVD" -k "$SOCK" -v 2>"$LOG" &
PID=$!
for ((i = 0; i < 100; i++)); do
    [[ -S $SOCK ]] && grep -q 'multipath support: \(active\|inactive\)' "$LOG" && break
    sleep 0.1
done
grep -q 'multipath support: active' "$LOG" || { sed 's/^/  reservd| /' "$LOG"; die "reservd's multipath support is not active"; }
grep -m1 -o 'multipath support: active[^;]*' "$LOG" | sed 's/^/  /'

step "(c) control: the single-path disk directly"
reset_lu "$SP"
run direct "$SP"

step "(b) the single-path disk through reservd"
reset_lu "$SP"
run sp "$SP" shim

step "(a) the multipath map through reservd"
reset_map
run map "$MP" shim

step "results"
for r in direct sp map; do cut -d' ' -f1 "$WORK/$r.res" >"$WORK/$r.names"; done
if ! cmp -s "$WORK/direct.names" "$WORK/sp.names" || ! cmp -s "$WORK/sp.names" "$WORK/map.names"; then
    die "the three runs did not run the same tests"
fi
grep -q ' pass$' "$WORK/direct.res" || die "no test passed on the single-path disk directly"
paste -d' ' "$WORK/direct.res" "$WORK/sp.res" "$WORK/map.res" | awk '
    BEGIN { printf "  %-32s %-10s %-12s %-12s\n", "test", "sp direct", "sp reservd", "map reservd" }
    { m = ($2 == $4 && $4 == $6) ? "" : "  <- differs"
      printf "  %-32s %-10s %-12s %-12s%s\n", $1, $2, $4, $6, m }
' | tee "$WORK/table"
bad=0
while read -r t c _ b _ a; do
    if [[ $b != "$c" ]]; then
        echo "DIFF $t: single-path disk $c directly, $b through reservd"
        section "$LOGS/libiscsi-sp.log" "$t"
        bad=1
    fi
    if [[ $a != "$b" ]]; then
        echo "DIFF $t: single-path disk $b through reservd, map $a through reservd"
        section "$LOGS/libiscsi-map.log" "$t"
        bad=1
    fi
done < <(paste -d' ' "$WORK/direct.res" "$WORK/sp.res" "$WORK/map.res")

step "reset"
reset_lu "$SP"
reset_map
kill -0 "$PID" 2>/dev/null || die "reservd died"
((bad == 0)) || die "libiscsi's PR tests end differently through reservd on the map, on the single-path disk and directly (logs: $LOGS/libiscsi-*.log)"
echo "PASS: $(grep -c . "$WORK/direct.res") libiscsi PR tests end the same way on the map through reservd, on the single-path disk through reservd and directly"
