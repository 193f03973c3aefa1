#!/bin/bash
# PID 1 of the reservd test VM, exec'd by the initramfs after switch_root.
#
# Sets up, inside the guest:
#   * LIO with the tcm_loop fabric: backstore "mp" exported through two tcm_loop
#     targets (two SCSI paths = two I_T nexuses to one LUN) and backstore "sp"
#     through a third (a plain single-path disk);
#   * a second cluster node's nexuses: a fourth target exporting "mp" (another
#     I_T nexus to the multipath LU, kept out of the map) and a fifth exporting
#     "sp";
#   * systemd-udevd and multipathd, which merge the two "mp" paths into
#     /dev/mapper/mpatha;
# then runs the scenario described in $rvm_xchg/job and leaves its output and
# exit status in the exchange dir, and powers off. Every failure ends with a
# status file and a power-off, never with a hang.
#
# Process starts cost ~70 ms each under TCG: the setup batches commands and
# uses shell builtins wherever it can.
#
# With run-vm.sh --systemd, systemd is PID 1 and runs this script as a unit
# (RVM_SYSTEMD=1, see systemd-boot.sh): systemd's own systemd-udevd and
# multipathd services then take the place of the daemons started here.

UNDER_SYSTEMD=0
[[ ${RVM_SYSTEMD:-} == 1 && -d /run/systemd/system ]] && UNDER_SYSTEMD=1
if (($$ != 1 && UNDER_SYSTEMD == 0)); then
    echo "guest-init.sh is PID 1 of the test VM; run tests/vm/run-vm.sh instead" >&2
    exit 2
fi
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LC_ALL=C.UTF-8
umask 022

# basic mounts (the initramfs normally did them already)
[[ -e /proc/self/stat ]] || mount -t proc proc /proc
[[ -d /sys/kernel ]] || mount -t sysfs sysfs /sys
[[ -e /dev/null ]] || mount -t devtmpfs devtmpfs /dev
[[ -e /dev/fd ]] || ln -s /proc/self/fd /dev/fd

XCHG=${rvm_xchg:-}
LOGDIR=$XCHG/logs
CFG=/sys/kernel/config/target
T_START=${EPOCHREALTIME/./}
T_LAST=$T_START
read -r UPTIME _ </proc/uptime 2>/dev/null
TIMINGS=("kernel+initramfs=${UPTIME:-?}s")

# ---- fixed identities (deterministic WWIDs and transport IDs) ---------------------
# LIO builds the NAA-6 designator from its IEEE company id 0x001405 and the first
# 25 hex digits of vpd_unit_serial; udev/multipath prefix the NAA type "3".
MP_SERIAL=c0ffee000000000000000a001
SP_SERIAL=c0ffee000000000000000b001
MP_WWID=36001405$MP_SERIAL
SP_WWID=36001405$SP_SERIAL
MP_ALIAS=mpatha
DISK_BYTES=$((64 * 1024 * 1024))
# tcm_loop: target WWN -> initiator (nexus) WWN, one SCSI host per target
MP_TARGETS=(naa.500140500000f0a1 naa.500140500000f0a2)
MP_INITIATORS=(naa.500140500000a001 naa.500140500000a002)
SP_TARGET=naa.500140500000f0b1
SP_INITIATOR=naa.500140500000b001
# node 2: one more nexus to each LU, standing for another host of the cluster
N2_MP_TARGET=naa.500140500000f0c1
N2_MP_INITIATOR=naa.500140500000c001
N2_SP_TARGET=naa.500140500000f0c2
N2_SP_INITIATOR=naa.500140500000c002
# Node 2's mp path has the map's WWID, so multipathd would add it to the map.
# A udev rule gives that one device (matched by its SCSI host) this ID_SERIAL
# instead: multipathd reads a SCSI path's WWID from udev's ID_SERIAL
# (uid_attribute), and blacklists it by WWID on every uevent, however often the
# path goes offline and back.
N2_MP_UDEV_WWID=reservd-vm-node2-$MP_WWID
LIO_FILES=/run/reservd-vm/lio

# ---- helpers -----------------------------------------------------------------------
say() { printf '[guest-init] %s\n' "$*"; }
mark() {   # record how long the step since the previous mark took
    local now=${EPOCHREALTIME/./}
    TIMINGS+=("$1=$(( (now - T_LAST) / 1000 ))ms")
    T_LAST=$now
}
# sleep without forking: read on a pipe nobody ever writes to
exec {SLEEPFD}<> <(:)
nap() { read -r -t "${1:-0.05}" -u "$SLEEPFD" _ 2>/dev/null; return 0; }

power_off() {
    sync
    echo o >/proc/sysrq-trigger 2>/dev/null
    nap 20
    echo b >/proc/sysrq-trigger 2>/dev/null
    while :; do nap 60; done
}

XCHG_OK=0
save_debug() {   # extra state for the host to print on failure
    ((XCHG_OK)) || return 0
    dmesg >"$LOGDIR/dmesg.txt" 2>&1
    if [[ -n ${MPATHD_PID:-} ]] && kill -0 "$MPATHD_PID" 2>/dev/null; then
        multipathd show topology >"$LOGDIR/multipath-topology.txt" 2>&1
    fi
    if ((UNDER_SYSTEMD)); then
        timeout 10 multipathd show topology >"$LOGDIR/multipath-topology.txt" 2>&1
        journalctl -b --no-pager -o short-monotonic >"$LOGDIR/journal.txt" 2>&1
        systemctl list-units --all --no-pager >"$LOGDIR/systemd-units.txt" 2>&1
    fi
}

die() {
    local msg="$*"
    say "SETUP FAILED: $msg" >&2
    if ((XCHG_OK)); then
        printf '%s\n' "$msg" >"$XCHG/setup-error"
        save_debug
        printf '%s\n' "${TIMINGS[@]}" >"$XCHG/guest-timings"
        echo 125 >"$XCHG/status"
    fi
    power_off
}

put() {   # put VALUE FILE: write a sysfs/configfs attribute, die on error
    printf '%s\n' "$1" >"$2" 2>/dev/null || die "cannot write '$1' to $2"
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll (builtins only) until COMMAND succeeds
wait_for() {
    local secs=$1 what=$2 deadline
    shift 2
    deadline=$(( ${EPOCHREALTIME/./} + secs * 1000000 ))
    until "$@"; do
        (( ${EPOCHREALTIME/./} < deadline )) || die "timed out after ${secs}s waiting for $what"
        nap 0.05
    done
}

is_mounted() {   # is_mounted MOUNTPOINT [FSTYPE]
    local mp fs rest
    while read -r _ mp fs rest; do
        [[ $mp == "$1" && ( -z ${2:-} || $fs == "$2" ) ]] && return 0
    done </proc/mounts
    return 1
}

# ---- exchange dir and job ---------------------------------------------------------
[[ -n $XCHG ]] || die "rvm_xchg not set"
is_mounted "$XCHG" 9p || die "exchange share not mounted on $XCHG"
: >"$XCHG/guest-started" || die "exchange dir $XCHG not writable"
XCHG_OK=1
[[ -r $XCHG/job ]] || die "no job file in $XCHG"
# shellcheck disable=SC1091
source "$XCHG/job" || die "cannot read $XCHG/job"
((${#RVM_ARGV[@]})) || die "job file names no scenario"
unset rvm_xchg rvm_init
mark boot

# Watchdog: a setup step that hangs still ends with a status and a power-off
# (the host's timeout is only the last resort). A subshell, so no exec.
SETUP_LIMIT=${RESERVD_VM_SETUP_LIMIT:-240}
( nap "$SETUP_LIMIT"; die "guest setup did not finish within ${SETUP_LIMIT}s" ) &
WATCHDOG_PID=$!

# more maps (RESERVD_VM_MAPS=N): maps.sh, its functions called below
# shellcheck source=maps.sh
. "${0%/*}/maps.sh" || die "cannot read ${0%/*}/maps.sh"
maps_init

# ---- config files, written before anything reads them -----------------------------
# LIO rewrites <dbroot>/pr/aptpl_<serial> on every REGISTER; without the dir the
# REGISTER is applied but fails with LOGICAL UNIT COMMUNICATION FAILURE.
mkdir -p /etc/target/pr /etc/target/alua /etc/multipath /etc/udev/rules.d "$LIO_FILES" "$LOGDIR" ||
    die "mkdir of /etc/target, /etc/multipath, /etc/udev/rules.d or $LIO_FILES failed"

# (builtins only: `read -d ''` keeps the here-document in a variable, no cat)
read -r -d '' MPCONF <<EOF
# written by tests/vm/guest-init.sh
defaults {
    find_multipaths strict
    # keys live in /etc/multipath/prkeys (multipath-tools 0.9.4 ignores a
    # reservation_key in the multipaths section)
    reservation_key file
    user_friendly_names no
    # path checks every 1-2 s (default 5-20 s): path state changes show quickly
    polling_interval 1
    max_polling_interval 2
    skip_kpartx yes
}
blacklist {
    wwid "^$SP_WWID\$"
    wwid "^reservd-vm-node2-"
}
devices {
    device {
        vendor "LIO-ORG"
        product ".*"
        path_grouping_policy multibus
        hardware_handler "1 alua"
        prio alua
        # tur, not directio (the default for LIO from 0.9.5 on): directio's
        # READ gets RESERVATION CONFLICT on a path that is not registered
        # while another node holds an exclusive-access reservation, and
        # multipathd fails the path. The access scenario runs
        # libmpathpersist with directio too.
        path_checker tur
        no_path_retry 12
    }
}
multipaths {
    multipath {
        wwid "$MP_WWID"
        alias $MP_ALIAS
    }
}
EOF
maps_mpconf
printf '%s\n' "$MPCONF" >/etc/multipath.conf || die "cannot write /etc/multipath.conf"
# find_multipaths strict: only WWIDs listed in the wwids file get a map
printf '%s\n' '# Multipath wwids, Version : 1.0' '# written by tests/vm/guest-init.sh' \
    "/$MP_WWID/" >/etc/multipath/wwids || die "cannot write /etc/multipath/wwids"
# (the header exactly as multipath-tools writes it: 0.11 and later check it)
printf '%s\n' '# Multipath bindings, Version : 1.0' \
    '# NOTE: this file is automatically maintained by the multipath program.' \
    '# You should not need to edit this file in normal circumstances.' '#' '# Format:' \
    '# alias wwid' '#' "$MP_ALIAS $MP_WWID" >/etc/multipath/bindings || die "cannot write bindings"
maps_wwids
# keys registered through libmpathpersist (reservation_key file) start empty
: >/etc/multipath/prkeys || die "cannot write /etc/multipath/prkeys"
mark config

# ---- kernel modules (one process) ---------------------------------------------------
modprobe -a configfs target_core_mod target_core_file target_core_iblock tcm_loop \
    sd_mod sg scsi_dh_alua dm_mod dm_multipath dm_round_robin dm_service_time ||
    die "modprobe failed"
[[ -d /sys/kernel/config ]] || die "no /sys/kernel/config after loading configfs"
is_mounted /sys/kernel/config configfs || mount -t configfs configfs /sys/kernel/config ||
    die "cannot mount configfs"
mark modules

# ---- LIO: two backstores, five tcm_loop targets ----------------------------------------
# Each target is one SCSI host (made with its configfs dir); the LUN's SCSI disk
# appears when the LUN is linked, after udevd and multipathd are up.
#   0, 1: paths 1 and 2 of mp (node 1, the map)   2: sp (node 1)
#   3: mp through node 2's nexus (not in the map) 4: sp through node 2's nexus
[[ -d $CFG ]] || die "$CFG missing after loading target_core_mod"
TARGETS=("${MP_TARGETS[@]}" "$SP_TARGET" "$N2_MP_TARGET" "$N2_SP_TARGET")
INITIATORS=("${MP_INITIATORS[@]}" "$SP_INITIATOR" "$N2_MP_INITIATOR" "$N2_SP_INITIATOR")
BACKSTORES=(fileio_0/mp fileio_0/mp fileio_1/sp fileio_0/mp fileio_1/sp)
maps_targets
NPATHS=${#TARGETS[@]}
TPGS=()
for t in "${TARGETS[@]}"; do TPGS+=("$CFG/loopback/$t/tpgt_1"); done
mkdir -p "$CFG/core/fileio_0/mp" "$CFG/core/fileio_1/sp" "${TPGS[@]/%//lun/lun_0}" ||
    die "cannot create the LIO configfs objects"
put "fd_dev_name=$LIO_FILES/mp.img,fd_dev_size=$DISK_BYTES" "$CFG/core/fileio_0/mp/control"
put "$MP_SERIAL" "$CFG/core/fileio_0/mp/wwn/vpd_unit_serial"
put 1 "$CFG/core/fileio_0/mp/enable"
put "fd_dev_name=$LIO_FILES/sp.img,fd_dev_size=$DISK_BYTES" "$CFG/core/fileio_1/sp/control"
put "$SP_SERIAL" "$CFG/core/fileio_1/sp/wwn/vpd_unit_serial"
put 1 "$CFG/core/fileio_1/sp/enable"
maps_backstores
HOSTS=() HCTLS=() SDS=() SGS=()
for ((i = 0; i < NPATHS; i++)); do
    # the I_T nexus must exist before the LUN is linked (the link scans the LUN)
    put "${INITIATORS[i]}" "${TPGS[i]}/nexus"
    read -r addr <"${TPGS[i]}/address" || die "cannot read ${TPGS[i]}/address"
    HOSTS[i]=${addr%%:*}
    HCTLS[i]=${HOSTS[i]}:0:${addr##*:}:0
done
# before udevd starts, so that its first event on that disk applies it
printf '%s\n' "# written by tests/vm/guest-init.sh: node 2's path to the mp LU is no multipath path" \
    "ACTION!=\"remove\", SUBSYSTEM==\"block\", KERNEL==\"sd*[!0-9]\", KERNELS==\"host${HOSTS[3]}\", ENV{ID_SERIAL}=\"$N2_MP_UDEV_WWID\", ENV{ID_SERIAL_SHORT}=\"$N2_MP_UDEV_WWID\", ENV{RESERVD_VM_NODE}=\"2\"" \
    >/etc/udev/rules.d/59-reservd-vm-node2.rules || die "cannot write the node 2 udev rule"
maps_udev_rules
mark lio-targets

# ---- udev, before any SCSI device appears (no coldplug: slow and not needed) --------
if ((UNDER_SYSTEMD)); then
    # systemd-udevd.service runs already: it reads the new rule
    udevadm control --reload || die "udevadm control --reload failed"
else
    /lib/systemd/systemd-udevd --daemon --resolve-names=never || die "systemd-udevd failed to start"
fi
mark udevd

# ---- multipathd: foreground mode (-d) as a background job, log in LOGDIR. Started
# before the LUNs exist so its start-up overlaps the LUN scans; it picks the
# paths up from their udev events. (Under systemd: multipathd.service, its log
# in the journal.)
MPATHD_PID=
if ((UNDER_SYSTEMD)); then
    systemctl --no-block start multipathd.service || die "systemctl start multipathd.service failed"
else
    multipathd -d >"$LOGDIR/multipathd.log" 2>&1 &
    MPATHD_PID=$!
fi

# ---- LIO: link the LUNs (each link scans one SCSI disk) --------------------------------
for ((i = 0; i < NPATHS; i++)); do
    b=${BACKSTORES[i]}
    ln -s "$CFG/core/$b" "${TPGS[i]}/lun/lun_0/${b#*/}" || die "cannot link the LUN of target ${TARGETS[i]}"
done
mark lio

# ---- find each path's sd and sg devices through sysfs ---------------------------------
scsi_nodes_ready() {
    local i d b g
    for ((i = 0; i < NPATHS; i++)); do
        d=/sys/bus/scsi/devices/${HCTLS[i]}
        b=("$d"/block/sd*) g=("$d"/scsi_generic/sg*)
        [[ -e ${b[0]} && -e ${g[0]} ]] || return 1
        SDS[i]=${b[0]##*/} SGS[i]=${g[0]##*/}
        [[ -b /dev/${SDS[i]} && -c /dev/${SGS[i]} ]] || return 1
    done
}
wait_for 60 "the SCSI disks (hosts ${HOSTS[*]})" scsi_nodes_ready
for ((i = 0; i < NPATHS; i++)); do
    read -r w <"/sys/block/${SDS[i]}/device/wwid" || die "no wwid for ${SDS[i]}"
    want=${XM_WANT[i]:-$MP_WWID}; [[ ${BACKSTORES[i]} == */sp ]] && want=$SP_WWID
    [[ ${w,,} == "naa.${want#3}" ]] ||
        die "${SDS[i]} has wwid '$w', expected naa.${want#3} (LIO's NAA derivation changed?)"
done
mark scsi

# ---- wait for the multipath map with both paths (and only them) -------------------------
map_ready() {
    [[ -z $MPATHD_PID ]] || kill -0 "$MPATHD_PID" 2>/dev/null || die "multipathd exited (see logs/multipathd.log)"
    local n dm slaves
    for dm in /sys/block/dm-*; do
        [[ -r $dm/dm/name ]] || continue
        read -r n <"$dm/dm/name"
        [[ $n == "$MP_ALIAS" ]] || continue
        slaves=("$dm"/slaves/*)
        [[ -e $dm/slaves/${SDS[3]} ]] &&
            die "node 2's path ${SDS[3]} joined $MP_ALIAS (udev rule not applied?)"
        [[ ${#slaves[@]} == 2 && -e $dm/slaves/${SDS[0]} && -e $dm/slaves/${SDS[1]} &&
            -b /dev/mapper/$MP_ALIAS ]] || return 1
        MP_DM=${dm##*/}
        return 0
    done
    return 1
}
wait_for 60 "/dev/mapper/$MP_ALIAS with paths ${SDS[0]} and ${SDS[1]}" map_ready
maps_wait
mark multipath

# multipathd must answer on its socket, and udev must be done with the new devices
# (libmpathpersist reads path properties from the udev database).
udevadm settle -t 30 || die "udevadm settle timed out"
topo=$(multipathd show topology 2>&1) || die "multipathd does not answer: $topo"
printf '%s\n' "$topo" >"$LOGDIR/multipath-topology-at-start.txt"
[[ $topo == *"$MP_ALIAS ($MP_WWID)"* ]] || die "multipathd does not show $MP_ALIAS: $topo"
for i in 2 3 4; do
    holders=(/sys/block/"${SDS[i]}"/holders/*)
    [[ ! -e ${holders[0]} ]] || die "${SDS[i]} (target ${TARGETS[i]}) is held by ${holders[*]##*/}"
done
[[ $topo != *" ${SDS[3]} "* ]] || die "multipathd shows node 2's path ${SDS[3]}: $topo"
# udev applied the node 2 rule (else a later uevent could let multipathd add the path)
read -r devno <"/sys/block/${SDS[3]}/dev" || die "no dev for ${SDS[3]}"
[[ -r /run/udev/data/b$devno ]] || die "no udev data for ${SDS[3]}"
udev_n2=
while read -r line; do
    [[ $line == "E:ID_SERIAL=$N2_MP_UDEV_WWID" ]] && udev_n2=1
done <"/run/udev/data/b$devno"
[[ -n $udev_n2 ]] || die "udev did not give ${SDS[3]} (node 2) the WWID $N2_MP_UDEV_WWID"
maps_check "$topo"
mark settle

# ---- run the scenario -------------------------------------------------------------------
export RESERVD_VM=1
export RESERVD_VM_XCHG=$XCHG
export RESERVD_VM_LOGDIR=$LOGDIR
export RESERVD_SP_DEV=/dev/${SDS[2]}
export RESERVD_SP_SG=/dev/${SGS[2]}
export RESERVD_SP_WWID=$SP_WWID
export RESERVD_SP_HOST=${HOSTS[2]}
export RESERVD_SP_INITIATOR=$SP_INITIATOR
export RESERVD_SP_TPG=${TPGS[2]}
export RESERVD_MP_DEV=/dev/mapper/$MP_ALIAS
export RESERVD_MP_ALIAS=$MP_ALIAS
export RESERVD_MP_DM=/dev/$MP_DM
export RESERVD_MP_WWID=$MP_WWID
export RESERVD_MP_PATHS="/dev/${SDS[0]} /dev/${SDS[1]}"
export RESERVD_MP_SGS="/dev/${SGS[0]} /dev/${SGS[1]}"
export RESERVD_MP_HOSTS="${HOSTS[0]} ${HOSTS[1]}"
export RESERVD_MP_HCTLS="${HCTLS[0]} ${HCTLS[1]}"
export RESERVD_MP_INITIATORS="${MP_INITIATORS[0]} ${MP_INITIATORS[1]}"
export RESERVD_MP_TPGS="${TPGS[0]} ${TPGS[1]}"
export RESERVD_LIO_PATH_HOSTS="${HOSTS[0]} ${HOSTS[1]} ${HOSTS[2]}"
export RESERVD_N2_MP_DEV=/dev/${SDS[3]}
export RESERVD_N2_MP_SG=/dev/${SGS[3]}
export RESERVD_N2_MP_INITIATOR=$N2_MP_INITIATOR
export RESERVD_N2_MP_HOST=${HOSTS[3]}
export RESERVD_N2_MP_TPG=${TPGS[3]}
export RESERVD_N2_SP_DEV=/dev/${SDS[4]}
export RESERVD_N2_SP_SG=/dev/${SGS[4]}
export RESERVD_N2_SP_INITIATOR=$N2_SP_INITIATOR
export RESERVD_N2_SP_HOST=${HOSTS[4]}
export RESERVD_N2_SP_TPG=${TPGS[4]}
export RESERVD_VM_RELEASE=${RVM_RELEASE:-bookworm}
export RESERVD_MPATH_VERSION=${RVM_MPATH_VERSION:-unknown}
maps_export

{
    printf '%s\n' "${TIMINGS[@]}" "total-setup=$(( (${EPOCHREALTIME/./} - T_START) / 1000 ))ms"
} >"$XCHG/guest-timings"
say "setup done: ${TIMINGS[*]}; mp=$RESERVD_MP_DEV ($RESERVD_MP_PATHS) sp=$RESERVD_SP_DEV" \
    "node2: mp=$RESERVD_N2_MP_DEV sp=$RESERVD_N2_SP_DEV; $RESERVD_VM_RELEASE, multipath-tools $RESERVD_MPATH_VERSION"
env | grep -E '^RESERVD_' | sort >"$LOGDIR/environment.txt"

cd "${RVM_CWD:-/}" 2>/dev/null || cd /
read -r UPTIME _ </proc/uptime 2>/dev/null
printf 'guest-uptime-at-scenario=%ss\n' "${UPTIME:-?}" >>"$XCHG/guest-timings"
kill "$WATCHDOG_PID" 2>/dev/null

# Scenario watchdog: 20 s before the host's timeout kills the VM, record what the
# guest is doing (blocked tasks through sysrq-w, processes, dmesg) so that a hang
# can be debugged, report status 124 and power off.
SCENARIO_WD_PID=
if [[ ${RVM_TIMEOUT:-} =~ ^[0-9]+$ ]]; then
    left=$(( RVM_TIMEOUT - 20 - ${UPTIME%%.*} ))
    if ((left > 5)); then
        (
            nap "$left"
            msg="TIMEOUT: scenario still running ${left}s after it started (guest watchdog, 20s before the host's ${RVM_TIMEOUT}s timeout)"
            say "$msg; dumping state to the log dir"
            printf '%s\n' "$msg" >"$XCHG/scenario-timeout"
            echo w >/proc/sysrq-trigger
            ps -eo pid,ppid,stat,wchan:32,etime,args >"$LOGDIR/ps.txt" 2>&1
            dmesg >"$LOGDIR/dmesg.txt" 2>&1
            timeout 5 multipathd show topology >"$LOGDIR/multipath-topology.txt" 2>&1
            echo 124 >"$XCHG/status"
            power_off
        ) &
        SCENARIO_WD_PID=$!
    fi
fi

: >"$XCHG/scenario-started"
"${RVM_ARGV[@]}" </dev/null >"$XCHG/output" 2>&1
rc=$?
[[ -n $SCENARIO_WD_PID ]] && kill "$SCENARIO_WD_PID" 2>/dev/null
say "scenario exited with status $rc"
((rc == 0)) || save_debug
echo "$rc" >"$XCHG/status"
power_off
