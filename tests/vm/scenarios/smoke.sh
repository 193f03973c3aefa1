#!/bin/bash
# Smoke test of the VM test bed: proves that the LIO disks implement persistent
# reservations, that the two multipath paths are two distinct I_T nexuses, that
# libmpathpersist (mpathpersist) fans a REGISTER out to both paths, that a
# path can be taken offline and brought back, and that node 2's nexuses are
# other initiator ports on the same LUs, its mp path outside the map.
#
# Run it with: tests/vm/run-vm.sh tests/vm/scenarios/smoke.sh
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

MP=$RESERVD_MP_DEV
SP=${RESERVD_SP_DEV:?}
P1=${MP_PATHS[0]} P2=${MP_PATHS[1]}
SG1=${MP_SGS[0]} SG2=${MP_SGS[1]}

echo "multipath map $MP over $P1 $P2 (sg $SG1 $SG2), single-path disk $SP ($RESERVD_SP_SG)"
((${#MP_PATHS[@]} == 2 && ${#MP_SGS[@]} == 2)) || fail "expected two multipath paths"
for d in "$MP" "$P1" "$P2" "$SP"; do [[ -b $d ]] || fail "$d is not a block device"; done
for d in "$SG1" "$SG2" "$RESERVD_SP_SG"; do [[ -c $d ]] || fail "$d is not a character device"; done

step "1. READ KEYS works on each path; the LUN starts without registrations"
for p in "$P1" "$P2" "$SG1" "$SG2"; do expect_no_keys "$p"; done
ok multipathd show topology
has "$RESERVD_MP_ALIAS ($RESERVD_MP_WWID)"
for p in "$P1" "$P2"; do has " ${p#/dev/} "; done
lacks " ${SP#/dev/} "

step "2. mpathpersist REGISTER on the map registers the key on BOTH paths"
ok mpathpersist --out --register --param-sark=0x1234 "$MP"
for p in "$P1" "$P2"; do expect_keys "$p" 0x1234 2; done
# READ FULL STATUS: one registration per initiator port (I_T nexus)
ok sg_persist --in --read-full-status "$P1"
for i in "${MP_INITIATORS[@]}"; do has "SAS address: 0x${i#naa.}"; done
[[ $(grep -ciE 'key *= *0x1234' <<<"$OUT") == 2 ]] || fail "READ FULL STATUS does not show 0x1234 twice"
ok mpathpersist --in --read-keys "$MP"
has "0x1234"
# reservation_key file: libmpathpersist told multipathd, which keeps it in /etc/multipath/prkeys
ok multipathd getprkey map "$RESERVD_MP_ALIAS"
has "0x1234"

step "3. mpathpersist unregister (REGISTER with SARK 0) clears both paths"
ok mpathpersist --out --register --param-rk=0x1234 --param-sark=0 "$MP"
for p in "$P1" "$P2"; do expect_no_keys "$p"; done
ok multipathd getprkey map "$RESERVD_MP_ALIAS"
has "none"

step "4. sg_persist REGISTER on the single-path disk"
expect_no_keys "$SP"
ok sg_persist --out --register --param-sark=0x5678 "$SP"
expect_keys "$SP" 0x5678 1
ok sg_persist --out --register --param-rk=0x5678 --param-sark=0 "$SP"
expect_no_keys "$SP"

step "5. RESERVE (type 5) by path 1 gives RESERVATION CONFLICT to the unregistered path 2"
ok sg_persist --out --register --param-sark=0xabc "$P1"
expect_keys "$P2" 0xabc 1
ok sg_persist --out --reserve --param-rk=0xabc --prout-type=5 "$P1"
ok sg_persist --in --read-reservation "$P2"
has "Key=0xabc"
has "Write Exclusive, registrants only"
# PR OUT RESERVE from an unregistered I_T nexus: RESERVATION CONFLICT (sg3_utils exit 24)
expect_rc 24 sg_persist --out --reserve --param-rk=0xdef --prout-type=5 "$P2"
has "reservation conflict"
# WRITE(10) of one block from the unregistered nexus: RESERVATION CONFLICT
expect_rc 24 sg_raw -s 512 -i /dev/zero "$SG2" 2a 00 00 00 00 00 00 00 01 00
has "Reservation Conflict"
# READ(10) is still allowed (Write Exclusive)
ok sg_raw -r 512 -o /dev/null "$SG2" 28 00 00 00 00 00 00 00 01 00
# the same WRITE from the reservation holder succeeds
ok sg_raw -s 512 -i /dev/zero "$SG1" 2a 00 00 00 00 00 00 00 01 00
lacks "Reservation Conflict"

step "6. CLEAR from path 1 drops the reservation and the registration"
ok sg_persist --out --clear --param-rk=0xabc "$P1"
ok sg_persist --in --read-reservation "$P2"
has "no reservation held"
for p in "$P1" "$P2"; do expect_no_keys "$p"; done

step "7. a path taken offline fails in multipathd; back online, multipathd re-registers the key"
path_offline "$P2"
mp_wait_path "$P2" "failed faulty" 30
ok mpathpersist --out --register --param-sark=0x4242 "$MP"
expect_keys "$P1" 0x4242 1
path_running "$P2"
mp_wait_path "$P2" "active ready" 30
for ((i = 0; i < 40; i++)); do   # multipathd registers the reinstated path asynchronously
    keys "$P1" >/dev/null
    [[ $(grep -c . <<<"$KEYS") == 2 ]] && break
    sleep 0.25
done
expect_keys "$P1" 0x4242 2
ok mpathpersist --out --register-ignore --param-sark=0 "$MP"
for p in "$P1" "$P2"; do expect_no_keys "$p"; done

step "8. node 2's nexuses: another initiator port on each LU, its mp path kept out of the map"
N2MP=${RESERVD_N2_MP_DEV:?} N2SP=${RESERVD_N2_SP_DEV:?}
for d in "$N2MP" "$N2SP"; do [[ -b $d ]] || fail "$d is not a block device"; done
for d in "$RESERVD_N2_MP_SG" "$RESERVD_N2_SP_SG"; do [[ -c $d ]] || fail "$d is not a character device"; done
ok multipathd show paths raw format "%d %w"
has "${P1#/dev/} $RESERVD_MP_WWID"
lacks "${N2MP#/dev/} "
ok sg_persist --out --register --param-sark=0x2222 "$N2MP"
expect_keys "$P1" 0x2222 1
ok sg_persist --in --read-full-status "$P1"
has "SAS address: 0x${RESERVD_N2_MP_INITIATOR#naa.}"
lacks "SAS address: 0x${MP_INITIATORS[0]#naa.}"
ok sg_persist --out --register --param-sark=0x3333 "$N2SP"
expect_keys "$SP" 0x3333 1
ok sg_persist --in --read-full-status "$SP"
has "SAS address: 0x${RESERVD_N2_SP_INITIATOR#naa.}"
# offline and back with a change uevent: multipathd still leaves the path alone
path_offline "$N2MP"
path_running "$N2MP"
ok udevadm trigger --action=change --settle "$N2MP"
sleep 2.5   # more than max_polling_interval
ok multipathd show paths raw format "%d"
lacks "${N2MP#/dev/}"
holders=(/sys/block/"${N2MP#/dev/}"/holders/*)
[[ ! -e ${holders[0]} ]] || fail "$N2MP is held by ${holders[*]##*/}"
ok sg_persist --out --register --param-rk=0x2222 --param-sark=0 "$N2MP"
ok sg_persist --out --register --param-rk=0x3333 --param-sark=0 "$N2SP"
for p in "$P1" "$SP"; do expect_no_keys "$p"; done

echo
echo "smoke: all checks passed"
