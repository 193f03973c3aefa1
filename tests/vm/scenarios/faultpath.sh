#!/bin/bash
# The fault injector of the test bed (tests/vm/faultpath.py): a third path to
# mpatha's LU whose PERSISTENT RESERVE commands are held back for a chosen
# time before the LU sees them. Proves that
#   * the new path is one more I_T nexus of the same LU (same WWID, joins the
#     map; a registration made through it is one the other paths and node 2
#     see; a reservation conflict is the LU's own);
#   * a held PR IN/OUT answers after the chosen time (4.5 s, 1.5 s), with the
#     LU's answer;
#     meanwhile the path's other commands, the map's other paths and node 2
#     answer at once;
#   * a held command can be released early, and one whose initiator gives up
#     (SCSI timeout, abort) is dropped: the LU never executes it;
#   * with ops=all every command of the path waits, TEST UNIT READY included;
#   * through libmpathpersist (mpathpersist on the map, the fault path its
#     only usable path) a PR IN held 1 s answers after 1 s, and a REGISTER
#     held longer than its SG_IO timeout (2 s asked, 7 s on a block device)
#     fails after 7 s; the dropped REGISTER leaves no key.
# Prints the measured times as a table at the end.
#
# Run it with: tests/vm/run-vm.sh tests/vm/scenarios/faultpath.sh
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

FP=$(cd "$(dirname "$0")/.." && pwd)/faultpath.py
MP=$RESERVD_MP_DEV
SG1=${MP_SGS[0]} SG2=${MP_SGS[1]}
P1=${MP_PATHS[0]} P2=${MP_PATHS[1]}
N2=${RESERVD_N2_MP_SG:?}
TIMES=()

cleanup() {
    for p in "$P1" "$P2"; do path_running "$p" 2>/dev/null || true; done
    [[ -n ${FAULTPATH_CTL:-} ]] && fpset delay=0 2>/dev/null || true
}
trap cleanup EXIT

# fpset SETTINGS...: write the control file (as `faultpath.py set fp1` does,
# without starting Python: that takes a second in this guest)
fpset() { echo "$*" >"$FAULTPATH_CTL.tmp" && mv "$FAULTPATH_CTL.tmp" "$FAULTPATH_CTL"; }
now_ms() { echo $(( ${EPOCHREALTIME/./} / 1000 )); }
# timed LABEL CMD...: run CMD (see run), keep its wall time in MS and in the table
timed() {
    local label=$1 t0
    shift
    t0=$(now_ms)
    run "$@"
    MS=$(( $(now_ms) - t0 ))
    echo "  ($MS ms)"
    TIMES+=("$label|$MS")
}
# within MS LO HI: the last timed command took between LO and HI ms
within() { ((MS >= $1 && MS <= $2)) || fail "took $MS ms, expected $1..$2 ms"; }
# held_now: wait (5 s at most) until the handler holds a command
held_now() {
    local i n
    for ((i = 0; i < 100; i++)); do
        read -r n <"${FAULTPATH_LOG%/log}/held" 2>/dev/null && ((n > 0)) && return 0
        sleep 0.05
    done
    fail "no command held after 5 s"
}
# logged PATTERN: the handler's log has a line matching PATTERN (grep -E)
logged() { grep -E -- "$1" "$FAULTPATH_LOG" || fail "no line '$1' in $FAULTPATH_LOG: $(cat "$FAULTPATH_LOG")"; }
fullstatus_has() {   # fullstatus_has SG INITIATOR KEY: READ FULL STATUS through SG lists INITIATOR with KEY
    local sg=$1 init=${2#naa.} key=$3
    ok sg_persist --in --read-full-status "$sg"
    awk -v k="$key" -v i="0x$init" '
        /Key=/ { split($0, a, "Key="); cur = tolower(a[2]); sub(/[^0-9a-fx].*/, "", cur) }
        /SAS address:/ { if (tolower($NF) == i && cur == k) found = 1 }
        END { exit !found }' <<<"$OUT" || fail "READ FULL STATUS through $sg does not list $2 with key $key"
}

step "1. A third path to mpatha's LU, behind the fault handler"
t0=$(now_ms)
eval "$("$FP" add "$RESERVD_MP_ALIAS" fp1)"
MS=$(( $(now_ms) - t0 )); TIMES+=("faultpath.py add, until multipathd has the path in the map|$MS")
echo "  fault path $FAULTPATH_DEV ($FAULTPATH_SG, $FAULTPATH_HCTL), nexus $FAULTPATH_INITIATOR, inner $FAULTPATH_INNER_SG, handler pid $FAULTPATH_PID ($MS ms)"
mp_wait_path "$FAULTPATH_DEV" "active ready" 30
ok multipathd show topology
for p in "$P1" "$P2" "$FAULTPATH_DEV"; do has " ${p#/dev/} "; done
ok sg_inq --page=0x83 "$FAULTPATH_SG"
has "${RESERVD_MP_WWID#3}"
# the inner nexus has no block device: only its sg node
[[ ! -e /sys/class/scsi_generic/${FAULTPATH_INNER_SG#/dev/}/device/block ]] || fail "the inner nexus has a block device"

step "2. Same LU, same PR state: a key registered through the fault path"
expect_no_keys "$SG1"
ok sg_persist --out --register --param-sark=0xfa01 "$FAULTPATH_SG"
expect_keys "$SG1" 0xfa01 1
expect_keys "$N2" 0xfa01 1
fullstatus_has "$SG2" "$FAULTPATH_INITIATOR" 0xfa01
# the path through which it is not registered conflicts, as on any nexus
ok sg_persist --out --reserve --param-rk=0xfa01 --prout-type=5 "$FAULTPATH_SG"
expect_rc 24 sg_raw -s 512 -i /dev/zero "$SG1" 2a 00 00 00 00 20 00 00 01 00
ok sg_raw -s 512 -i /dev/zero "$FAULTPATH_SG" 2a 00 00 00 00 20 00 00 01 00
ok sg_persist --out --release --param-rk=0xfa01 --prout-type=5 "$FAULTPATH_SG"
ok sg_persist --out --register --param-rk=0xfa01 --param-sark=0 "$FAULTPATH_SG"
expect_no_keys "$N2"

step "3. Baseline: no fault"
# (each figure includes starting a process: 0.1 to 0.8 s in this guest, more
# on a loaded host: the bounds leave 4 s, under the 4.5 s holds below)
timed "PR IN READ KEYS through the fault path, no fault" sg_persist --in -k "$FAULTPATH_SG"
within 0 4000
timed "PR IN READ KEYS through path 1, no fault" sg_persist --in -k "$SG1"
within 0 4000

step "4. PR commands held 4500 ms; the path's TUR, path 1 and node 2 answer meanwhile"
ok fpset delay=4500 ops=pr
t0=$(now_ms)
sg_persist --in -k "$FAULTPATH_SG" >/tmp/fp-held.out 2>&1 &
held=$!
held_now
timed "TEST UNIT READY through the fault path while a PR IN is held" sg_turs "$FAULTPATH_SG"
within 0 4000
timed "PR IN through path 1 while the fault path's PR IN is held" sg_persist --in -k "$SG1"
within 0 4000
timed "PR IN through node 2 while the fault path's PR IN is held" sg_persist --in -k "$N2"
within 0 4000
wait "$held" || fail "the held READ KEYS failed: $(cat /tmp/fp-held.out)"
MS=$(( $(now_ms) - t0 )); TIMES+=("PR IN held 4500 ms, until answered|$MS")
echo "  held READ KEYS answered after $MS ms"
within 4450 12000
logged "op=5e/00 held_ms=4[0-9][0-9][0-9] passed status=0x00"
timed "PR OUT REGISTER held 4500 ms" sg_persist --out --register --param-sark=0xfa02 "$FAULTPATH_SG"
((RC == 0)) || fail "held REGISTER failed"
within 4450 12000
expect_keys "$SG1" 0xfa02 1
logged "op=5f/00 held_ms=4[0-9][0-9][0-9] passed status=0x00"
# the LU's own answer comes back after the hold: a wrong key conflicts
ok fpset delay=1500 ops=pr
timed "PR OUT RESERVE with a wrong key, held 1500 ms" sg_persist --out --reserve --param-rk=0x9999 --prout-type=5 "$FAULTPATH_SG"
((RC == 24)) || fail "RESERVE with a wrong key: exit $RC, expected 24 (RESERVATION CONFLICT)"
within 1450 6000
logged "op=5f/01 held_ms=1[4-9][0-9][0-9] passed status=0x18"

step "5. Held until released: delay=-1, then delay=0 after 1 s"
ok fpset delay=-1
t0=$(now_ms)
sg_persist --in -k "$FAULTPATH_SG" >/tmp/fp-held.out 2>&1 &
held=$!
held_now
sleep 1
fpset delay=0
wait "$held" || fail "the released READ KEYS failed: $(cat /tmp/fp-held.out)"
MS=$(( $(now_ms) - t0 )); TIMES+=("PR IN held until released after 1 s|$MS")
echo "  released READ KEYS answered after $MS ms"
within 950 5000
has_key=$(cat /tmp/fp-held.out)
grep -qi 0xfa02 <<<"$has_key" || fail "the released READ KEYS does not list 0xfa02: $has_key"

step "6. The initiator gives up (2 s SCSI timeout) on a command held 5 s: it is dropped"
ok fpset delay=5000
# REGISTER AND IGNORE EXISTING KEY 0xfa03, parameter list of 24 bytes
timed "PR OUT REGISTER AND IGNORE held 5 s, sg_raw --timeout=2" \
    sg_raw --timeout=2 -s 24 -i <(printf '\0\0\0\0\0\0\0\0\0\0\0\0\0\0\xfa\x03\0\0\0\0\0\0\0\0') \
    "$FAULTPATH_SG" 5f 06 00 00 00 00 00 00 18 00
((RC != 0)) || fail "a command held past its timeout succeeded"
within 1900 6500
for ((i = 0; i < 100; i++)); do grep -q "op=5f/06 .* aborted" "$FAULTPATH_LOG" && break; sleep 0.1; done
logged "tmr type=1 "
logged "op=5f/06 held_ms=[0-9]+ aborted"
ok fpset delay=0
expect_keys "$SG1" 0xfa02 1

step "7. ops=all: every command of the path waits, TEST UNIT READY included"
ok fpset delay=4500 ops=all
timed "TEST UNIT READY through the fault path, ops=all delay=4500" sg_turs "$FAULTPATH_SG"
within 4450 12000
timed "TEST UNIT READY through path 1, ops=all on the fault path" sg_turs "$SG1"
within 0 4000
ok fpset delay=0 ops=pr
ok sg_persist --out --register --param-rk=0xfa02 --param-sark=0 "$FAULTPATH_SG"
expect_no_keys "$SG1"

step "8. libmpathpersist on the map, the fault path its only usable path"
path_offline "$P1"
path_offline "$P2"
mp_wait_path "$P1" "failed faulty" 30
mp_wait_path "$P2" "failed faulty" 30
ok fpset delay=1000
timed "mpathpersist --in -k on the map, PR held 1 s" mpathpersist --in -k "$MP"
((RC == 0)) || fail "mpathpersist READ KEYS with a 1 s hold failed"
within 950 5000
# libmpathpersist asks for a 2 s SG_IO timeout, but on a block device the
# kernel raises any SG_IO timeout to 7 s (BLK_MIN_SG_TIMEOUT)
ok fpset delay=-1
timed "mpathpersist REGISTER on the map, PR held until aborted (its SG_IO timeout: 7 s)" \
    mpathpersist --out --register --param-sark=0xfa04 "$MP"
((RC != 0)) || fail "mpathpersist REGISTER held past its timeout succeeded"
within 6900 20000
for ((i = 0; i < 100; i++)); do grep -q "op=5f/00 .* aborted" "$FAULTPATH_LOG" && break; sleep 0.1; done
logged "op=5f/00 held_ms=[0-9]+ aborted"
ok fpset delay=0
expect_no_keys "$FAULTPATH_SG"
path_running "$P1"
path_running "$P2"
mp_wait_path "$P1" "active ready" 30
mp_wait_path "$P2" "active ready" 30
ok multipathd unsetprkey map "$RESERVD_MP_ALIAS"

step "Handler log"
cat "$FAULTPATH_LOG"
[[ ! -s ${FAULTPATH_LOG%/log}/handler.out ]] || { cat "${FAULTPATH_LOG%/log}/handler.out"; fail "the handler wrote errors"; }
kill -0 "$FAULTPATH_PID" || fail "the handler is gone"

echo
echo "| step | wall time |"
echo "|---|---|"
for t in "${TIMES[@]}"; do printf '| %s | %s ms |\n' "${t%%|*}" "${t##*|}"; done
echo
echo "faultpath: all checks passed"
