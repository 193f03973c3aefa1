#!/bin/bash
# reservd on a real dm-multipath stack (LIO disks, two paths, multipathd):
# every PR command sent through reservd on the map must leave both paths in
# the state SPC-4 and libmpathpersist promise, survive a path going down,
# and the same commands on the single-path disk go through SG_IO. reservd
# runs with --seccomp=log: at the end, the kernel log must hold no call the
# allow-list would have refused (path down, PREEMPT, CLEAR and CLEANUP
# included), so enforce mode would have behaved the same.
#
# Runs inside the test VM: tests/vm/run-vm.sh tests/vm/scenarios/multipath.sh
# (needs target/debug/reservd and target/debug/reservdctl built).
set -euo pipefail

: "${RESERVD_MP_DEV:?not inside the reservd test VM}"
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
RESERVD=${RESERVD_BIN:-$ROOT/target/debug/reservd}
CTL=${RESERVD_RESERVDCTL:-$ROOT/target/debug/reservdctl}
read -r -a PATHS <<<"$RESERVD_MP_PATHS"
read -r -a INITIATORS <<<"$RESERVD_MP_INITIATORS"
MP=$RESERVD_MP_DEV
SP=$RESERVD_SP_DEV
P1=${PATHS[0]} P2=${PATHS[1]}
WORK=$(mktemp -d /tmp/reservd-mp.XXXXXX)
SOCK=$WORK/reservd.sock
LOG=$WORK/reservd.log
PID=

die() { echo "FAIL: $*" >&2; [[ -r $LOG ]] && sed 's/^/  reservd| /' "$LOG" >&2; exit 1; }
step() { echo; echo "=== $*"; }
cleanup() {
    [[ -n $PID ]] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
    for p in "${PATHS[@]}"; do echo running >"/sys/block/${p#/dev/}/device/state" 2>/dev/null || true; done
}
trap cleanup EXIT

# pr DEV ARGS...: one command through reservd (reservdctl); sets STATUS,
# SENSE, DATA. ARGS: in SA [ALLOC] | out SA TYPE KEY SA_KEY [FLAGS] |
# raw CDB [PARAMS] | cleanup. PR IN opens DEV read-only, the others
# read-write.
pr() {
    local dev=$1 what=$2 out cdb data= ro=
    shift 2
    case $what in
    in) cdb=$(printf '5e%02x0000000000%04x00' "$1" "${2:-8192}") ro=--read-only ;;
    out)
        cdb=$(printf '5f%02x%02x00000000001800' "$1" "$2")
        data=$(printf '%016x%016x00000000%02x000000' "$3" "$4" "${5:-0}")
        ;;
    raw) cdb=$1 data=${2:-} ;;
    cleanup) ;;
    *) die "pr: unknown command $what" ;;
    esac
    # A refusal is an exit status of its own: the JSON says which.
    if [[ $what == cleanup ]]; then
        out=$("$CTL" -k "$SOCK" --json cleanup "$dev") || true
    else
        out=$("$CTL" -k "$SOCK" --json raw "$dev" --cdb "$cdb" --data "$data" $ro) || true
    fi
    echo "  reservd $dev $what $* -> $out"
    [[ $out =~ \"status\":([0-9]+) ]] || die "unexpected reservdctl output: $out"
    STATUS=$(printf '0x%02x' "${BASH_REMATCH[1]}")
    SENSE= DATA=
    [[ $out =~ \"sense\":\"([0-9a-f]*)\" ]] && SENSE=${BASH_REMATCH[1]}
    [[ $out =~ \"data\":\"([0-9a-f]*)\" ]] && DATA=${BASH_REMATCH[1]}
    return 0
}
# good DEV ARGS...: the command must answer GOOD
good() { pr "$@"; [[ $STATUS == 0x00 ]] || die "expected GOOD for '$*', got $STATUS sense $SENSE"; }
# sense_is KEY ASC ASCQ: the last answer is CHECK CONDITION with that sense
sense_is() {
    [[ $STATUS == 0x02 ]] || die "expected CHECK CONDITION, got $STATUS"
    local got="${SENSE:4:2}/${SENSE:24:2}/${SENSE:26:2}"
    [[ $got == "$1/$2/$3" ]] || die "expected sense $1/$2/$3, got $got"
}

# sg_keys DEV: the keys READ KEYS lists on DEV, one per line
# (a UNIT ATTENTION, e.g. "reservations preempted" after a CLEAR from the
# other nexus, is consumed and the command repeated)
sg_keys() {
    local out i
    for i in 1 2 3; do out=$(sg_persist --in --read-keys "$1" 2>&1) && break; done
    awk 'NF == 1 && $1 ~ /^0x/ { print tolower($1) }' <<<"$out"
}
# expect_lu_keys KEY COUNT: both paths see KEY exactly COUNT times and nothing else
expect_lu_keys() {
    local p k
    for p in "${PATHS[@]}"; do
        k=$(sg_keys "$p")
        echo "  sg_persist -k $p: ${k//$'\n'/ }"
        if [[ $2 == 0 ]]; then
            [[ -z $k ]] || die "$p: expected no keys, got ${k//$'\n'/ }"
        else
            [[ $(grep -c . <<<"$k") == "$2" && $(grep -cxF "$1" <<<"$k") == "$2" ]] ||
                die "$p: expected $1 x$2, got ${k//$'\n'/ }"
        fi
    done
}
# raw_in DEV SA: the device's own PR IN answer (as many bytes as it
# returned for an allocation length of 8192), hex, through sg_raw
raw_in() {
    local i
    for i in 1 2 3; do
        rm -f "$WORK/raw"
        sg_raw -R -r 8192 -o "$WORK/raw" "$1" 5e "0$2" 00 00 00 00 00 20 00 00 >/dev/null 2>&1 && break
    done
    [[ -e $WORK/raw ]] || die "sg_raw PR IN $2 on $1 failed"
    od -An -v -tx1 "$WORK/raw" | tr -d ' \n'
}
# reservation DATA: "KEY TYPE" from READ RESERVATION data, or "none"
reservation() {
    if [[ ${1:8:8} == 00000000 ]]; then echo none; else echo "0x${1:16:16} ${1:43:1}"; fi
}
mp_state() { multipathd show paths raw format "%d %t %T" | awk -v d="${1#/dev/}" '$1 == d { print $2, $3 }'; }
wait_state() {
    local i st=
    for ((i = 0; i < 160; i++)); do
        st=$(mp_state "$1"); [[ $st == "$2" ]] && { echo "  $1: $st"; return 0; }
        sleep 0.25
    done
    die "$1: multipathd state '$st', expected '$2'"
}

[[ -x $RESERVD && -x $CTL ]] || die "build reservd and reservdctl first"
echo "map $MP over ${PATHS[*]}, single-path $SP"

step "reservd starts with multipath support"
"$RESERVD" -k "$SOCK" --enable-cleanup --seccomp=log -v 2>"$LOG" &
PID=$!
# libmpathpersist loads in the background once reservd serves: wait for
# the line that says how that went.
for ((i = 0; i < 100; i++)); do [[ -S $SOCK ]] && grep -q 'multipath support: \(active\|inactive\)' "$LOG" && break; sleep 0.1; done
[[ -S $SOCK ]] || die "reservd did not create its socket"
sed 's/^/  reservd| /' "$LOG"
grep -q "multipath support: active (multipath-tools ${RESERVD_MPATH_VERSION:-}" "$LOG" || die "multipath support not active (multipath-tools ${RESERVD_MPATH_VERSION:-?})"
grep '^Cap\(Eff\|Prm\|Bnd\)' /proc/$PID/status
[[ $(awk '/^CapEff/ { print $2 }' /proc/$PID/status) == 0000000000220000 ]] ||
    die "reservd should keep exactly CAP_SYS_RAWIO and CAP_SYS_ADMIN"

step "READ KEYS on the map: empty, same bytes as the device"
good "$MP" in 0
[[ $DATA == "$(raw_in "$P1" 0)" ]] || die "READ KEYS differs from the device's"
expect_lu_keys x 0

step "REGISTER through the map puts the key on both paths; the map lists it once"
T0=$EPOCHREALTIME
good "$MP" out 0 0 0 0x1234
echo "  REGISTER took $(( (${EPOCHREALTIME/./} - ${T0/./}) / 1000 )) ms"
expect_lu_keys 0x1234 2
good "$MP" in 0
RAW=$(raw_in "$P2" 0)
[[ ${RAW:8:8} == 00000010 ]] || die "expected two keys on the device: $RAW"
# one nexus, one registration: the device's generation, the key once
[[ $DATA == "${RAW:0:8}00000008${RAW:16:16}" ]] || die "READ KEYS through the map: $DATA (device $RAW)"

step "REPORT CAPABILITIES"
good "$MP" in 2
[[ $DATA == "$(raw_in "$P1" 2)" ]] || die "REPORT CAPABILITIES differs from the device's"

step "RESERVE type 5 (Write Exclusive, registrants only)"
good "$MP" out 1 5 0x1234 0
good "$MP" in 1
[[ $(reservation "$DATA") == "0x0000000000001234 5" ]] || die "READ RESERVATION: $DATA"
for p in "${PATHS[@]}"; do [[ $DATA == "$(raw_in "$p" 1)" ]] || die "READ RESERVATION differs on $p"; done
# allocation length 8: header only, ADDITIONAL LENGTH kept
good "$MP" in 1 8
[[ $DATA == "${DATA:0:16}" && ${#DATA} == 16 && ${DATA:8:8} == 00000010 ]] || die "short READ RESERVATION: $DATA"

step "READ FULL STATUS (qemu-pr-helper refuses it on multipath): one descriptor for the map"
good "$MP" in 3
RAW=$(raw_in "$P1" 3)
echo "  device: $RAW"
echo "  map:    $DATA"
for i in "${INITIATORS[@]}"; do [[ $RAW == *"${i#naa.}"* ]] || die "initiator $i missing on the device"; done
# the holder's descriptor (R_HOLDER set) stands for the map
n=0
for i in "${INITIATORS[@]}"; do [[ $DATA == *"${i#naa.}"* ]] && n=$((n + 1)); done
[[ $n == 1 ]] || die "the map's READ FULL STATUS names $n of its initiators, expected 1"
[[ ${DATA:0:8} == "${RAW:0:8}" ]] || die "generation differs"
[[ ${DATA:40:2} == 01 ]] || die "the map's descriptor is not the holder's: $DATA"

step "RELEASE, then RESERVE type 7 (all registrants)"
good "$MP" out 2 5 0x1234 0
good "$MP" in 1
[[ $(reservation "$DATA") == none ]] || die "still reserved: $DATA"
expect_lu_keys 0x1234 2
good "$MP" out 1 7 0x1234 0
good "$MP" in 1
[[ ${DATA:43:1} == 7 ]] || die "expected a type 7 reservation: $DATA"
good "$MP" out 2 7 0x1234 0

step "PREEMPT of the own key (type 5 to 6): the map stays one nexus, every path keeps the key"
good "$MP" out 1 5 0x1234 0
good "$MP" out 4 6 0x1234 0x1234
good "$MP" in 1
[[ $(reservation "$DATA") == "0x0000000000001234 6" ]] || die "after PREEMPT: $DATA"
expect_lu_keys 0x1234 2
# a write through each path succeeds (type 6: registrants only)
for p in "${PATHS[@]}"; do
    sg_raw -s 512 -i /dev/zero "$p" 2a 00 00 00 00 10 00 00 01 00 >/dev/null 2>&1 ||
        die "WRITE through $p after the self-PREEMPT: $(sg_raw -s 512 -i /dev/zero "$p" 2a 00 00 00 00 10 00 00 01 00 2>&1 | tail -n1)"
done
echo "  WRITE through each path: GOOD"
good "$MP" out 2 6 0x1234 0
# REGISTER AND IGNORE EXISTING KEY with the same key changes nothing
good "$MP" out 6 0 0 0x1234
expect_lu_keys 0x1234 2

step "Errors are answers: REGISTER AND MOVE, 33 TransportIDs, bad key"
pr "$MP" raw 5f070000000000001800 000000000000123400000000000000000000000000000000
sense_is 05 24 00
TIDS=$(for ((i = 0; i < 33; i++)); do printf '0600000050014050%08x000000000000000000000000' "$i"; done)
LEN=$(( 24 + 4 + 33 * 24 ))
pr "$MP" raw "5f000000000000$(printf '%04x' $LEN)00" \
    "0000000000000000000000000000567800000000080000000000$(printf '%04x' $((33 * 24)))$TIDS"
sense_is 05 26 00
# a key other than the map's: the device's answer, as to one nexus
pr "$MP" out 1 5 0x9999 0
[[ $STATUS == 0x18 ]] || die "RESERVE with a wrong key: expected RESERVATION CONFLICT, got $STATUS"
pr "$MP" out 0 0 0x9999 0x5555
[[ $STATUS == 0x18 ]] || die "REGISTER with a wrong key: expected RESERVATION CONFLICT, got $STATUS"
expect_lu_keys 0x1234 2

step "CLEAR drops everything on both paths"
good "$MP" out 3 0 0x1234 0
expect_lu_keys x 0
good "$MP" in 1
[[ $(reservation "$DATA") == none ]] || die "reservation left after CLEAR"

step "REGISTER then unregister (REGISTER with SARK 0)"
good "$MP" out 0 0 0 0x1234
expect_lu_keys 0x1234 2
good "$MP" out 0 0 0x1234 0
expect_lu_keys x 0

step "One path offline: commands still succeed; back online, multipathd re-registers it"
echo offline >"/sys/block/${P2#/dev/}/device/state"
wait_state "$P2" "failed faulty"
good "$MP" out 0 0 0 0x4242
good "$MP" in 0
[[ ${DATA:8:8} == 00000008 ]] || die "expected one registration with $P2 down: $DATA"
good "$MP" out 1 5 0x4242 0
good "$MP" in 1
[[ $(reservation "$DATA") == "0x0000000000004242 5" ]] || die "RESERVE with a path down: $DATA"
good "$MP" in 3
good "$MP" out 2 5 0x4242 0
echo running >"/sys/block/${P2#/dev/}/device/state"
multipathd reinstate path "${P2#/dev/}" >/dev/null 2>&1 || true
wait_state "$P2" "active ready"
for ((i = 0; i < 80; i++)); do
    [[ $(sg_keys "$P1" | grep -c .) == 2 ]] && break
    sleep 0.25
done
expect_lu_keys 0x4242 2

step "CLEANUP: multipathd forgets the key, both I_T nexuses are unregistered"
multipathd getprkey map "$RESERVD_MP_ALIAS"
good "$MP" cleanup
expect_lu_keys x 0
K=$(multipathd getprkey map "$RESERVD_MP_ALIAS")
echo "  multipathd getprkey: $K"
[[ $K == none* ]] || die "multipathd still has key $K"

step "The single-path disk goes through SG_IO"
good "$SP" in 0
[[ ${DATA:8:8} == 00000000 ]] || die "single-path disk not empty: $DATA"
good "$SP" out 0 0 0 0x77
[[ $(sg_keys "$SP") == 0x77 ]] || die "single-path REGISTER: $(sg_keys "$SP")"
good "$SP" out 1 5 0x77 0
good "$SP" in 1
[[ $DATA == "$(raw_in "$SP" 1)" && $(reservation "$DATA") == "0x0000000000000077 5" ]] || die "$DATA"
good "$SP" in 3
[[ $DATA == "$(raw_in "$SP" 3)" ]] || die "single-path READ FULL STATUS differs"
good "$SP" out 2 5 0x77 0
good "$SP" out 3 0 0x77 0
[[ -z $(sg_keys "$SP") ]] || die "single-path CLEAR left keys"
good "$SP" cleanup

step "reservd log"
sed 's/^/  reservd| /' "$LOG"
grep -q 'panicked' "$LOG" && die "reservd panicked"

step "No system call outside the seccomp allow-list (kernel log, audit type 1326)"
kill "$PID"; wait "$PID" 2>/dev/null || true
sleep 0.3
refused=$(dmesg | grep 'type=1326' | grep " pid=$PID " || true)
PID=
[[ -z $refused ]] || die "calls the allow-list would refuse: $refused"
echo "  none for reservd's pid"
echo
echo "multipath: all checks passed"
