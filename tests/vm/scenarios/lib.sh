# shellcheck shell=bash
# Helpers for scenarios run by tests/vm/run-vm.sh. Source it:
#   . "$(dirname "$0")/lib.sh"
# It sets `set -euo pipefail`, checks that it runs inside the test VM and
# provides assertion helpers that print every command and its output.
set -euo pipefail

if [[ -z ${RESERVD_VM:-} || -z ${RESERVD_MP_DEV:-} ]]; then
    echo "not inside the reservd test VM; run: tests/vm/run-vm.sh $0" >&2
    exit 2
fi
# shellcheck disable=SC2034  # used by the scenarios
read -r -a MP_PATHS <<<"$RESERVD_MP_PATHS"        # /dev/sdX of the two paths
# shellcheck disable=SC2034
read -r -a MP_SGS <<<"$RESERVD_MP_SGS"            # /dev/sgN of the two paths
# shellcheck disable=SC2034
read -r -a MP_INITIATORS <<<"$RESERVD_MP_INITIATORS"

OUT='' RC=0 KEYS=''
fail() { echo "FAIL: $*" >&2; exit 1; }
LIB_T0=${EPOCHREALTIME/./}
# step TEXT: a header with the time since the scenario started
step() {
    local us=$(( ${EPOCHREALTIME/./} - LIB_T0 ))
    printf '\n=== [+%d.%01ds] %s\n' $((us / 1000000)) $(( (us % 1000000) / 100000 )) "$*"
}

# run CMD...: print the command, its output and exit status; leave them in OUT and RC
run() {
    echo "+ $*"
    RC=0
    OUT=$("$@" 2>&1) || RC=$?
    [[ -z $OUT ]] || printf '%s\n' "$OUT" | sed 's/^/  | /'
    echo "  -> exit $RC"
}
# ok CMD...: run CMD, which must exit 0
ok() { run "$@"; ((RC == 0)) || fail "'$*' exited with $RC"; }
# expect_rc N CMD...: run CMD, which must exit N (sg3_utils: 24 = RESERVATION CONFLICT)
expect_rc() { local want=$1; shift; run "$@"; ((RC == want)) || fail "'$*' exited with $RC, expected $want"; }
# has STRING / lacks STRING: the last command's output contains / lacks STRING (case-insensitive)
has() { grep -qiF -- "$1" <<<"$OUT" || fail "expected '$1' in the output of the last command"; }
lacks() { ! grep -qiF -- "$1" <<<"$OUT" || fail "did not expect '$1' in the output of the last command"; }

# keys DEV: PR IN READ KEYS with sg_persist; KEYS gets the keys, one per line, lower case
keys() {
    ok sg_persist --in --read-keys "$1"
    KEYS=$(awk 'NF == 1 && $1 ~ /^0x[0-9a-fA-F]+$/ { print tolower($1) }' <<<"$OUT")
}
# expect_keys DEV KEY COUNT: the LU behind DEV lists KEY exactly COUNT times and nothing else
expect_keys() {
    local dev=$1 key=${2,,} count=$3 n total
    keys "$dev"
    n=$(grep -cxF -- "$key" <<<"$KEYS" || true)
    total=$(grep -c . <<<"$KEYS" || true)
    ((n == count && total == count)) ||
        fail "$dev: expected key $key $count time(s) and nothing else, READ KEYS gave: ${KEYS//$'\n'/ }"
}
# expect_no_keys DEV: no registrations on the LU behind DEV
expect_no_keys() {
    keys "$1"
    [[ -z $KEYS ]] || fail "$1: expected no registered keys, READ KEYS gave: ${KEYS//$'\n'/ }"
    has "no registered reservation keys"
}

# path_offline /dev/sdX, path_running /dev/sdX: take a SCSI path down / bring it back
path_offline() { echo offline >"/sys/block/${1#/dev/}/device/state"; }
path_running() { echo running >"/sys/block/${1#/dev/}/device/state"; }
# mp_path_state /dev/sdX: multipathd's view "dm_state checker_state", e.g. "active ready"
mp_path_state() {
    multipathd show paths raw format "%d %t %T" | awk -v d="${1#/dev/}" '$1 == d { print $2, $3 }'
}
# mp_wait_path /dev/sdX "active ready" [SECS]: wait until multipathd reports that state
mp_wait_path() {
    local dev=$1 want=$2 secs=${3:-30} i st=
    for ((i = 0; i < secs * 4; i++)); do
        st=$(mp_path_state "$dev")
        [[ $st == "$want" ]] && { echo "  $dev: $st"; return 0; }
        sleep 0.25
    done
    fail "$dev: multipathd state '$st', expected '$want' within ${secs}s"
}
