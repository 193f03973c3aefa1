# shellcheck shell=bash
# More multipath maps for the test VM, sourced by guest-init.sh (PID 1), which
# calls these functions at the points of its set-up named below; with
# RESERVD_VM_MAPS unset or 1 they do nothing.
#
# RESERVD_VM_MAPS=N: mpatha and N-1 more maps, mpathb, mpathc, ... (N <= 15).
# Map k is a 16 MiB fileio backstore (serial c0ffee000000000000000a00k, so
# WWID 36001405c0ffee000000000000000a00k) behind two tcm_loop targets (target
# naa.50014050000<k>f0a<p>, initiator naa.50014050000<k>a00<p>, p = 1, 2);
# with RESERVD_VM_MAPS_NODE2=1 also behind a node-2 nexus (target
# naa.50014050000<k>f0c1, initiator naa.50014050000<k>c001), kept out of the
# map as mpatha's is (udev gives it the WWID reservd-vm-node2-<WWID>).
#
# Uses guest-init.sh's variables and helpers (die, put, CFG, LIO_FILES,
# TARGETS, INITIATORS, BACKSTORES, HOSTS, SDS, SGS, ...).

XM_LETTERS=abcdefghijklmnop XM_HEX=0123456789abcdef
XM_ALIAS=() XM_WWID=() XM_SERIAL=() XM_IDX=() XM_DM=() XM_WANT=()

# after the job is read: the maps' identities
maps_init() {
    NMAPS=${RESERVD_VM_MAPS:-1} XM_N2=${RESERVD_VM_MAPS_NODE2:-0}
    [[ $NMAPS =~ ^[0-9]+$ ]] && ((NMAPS >= 1 && NMAPS <= 15)) ||
        die "RESERVD_VM_MAPS=$NMAPS: expected 1 to 15"
    local k
    for ((k = 2; k <= NMAPS; k++)); do
        printf -v 'XM_SERIAL[k]' 'c0ffee000000000000000a%03x' "$k"
        XM_WWID[k]=36001405${XM_SERIAL[k]}
        XM_ALIAS[k]=mpath${XM_LETTERS:k-1:1}
    done
}

# before multipath.conf is written: one more entry at the end of multipaths {}
maps_mpconf() {
    local k
    for ((k = 2; k <= NMAPS; k++)); do
        MPCONF=${MPCONF%\}}"    multipath {
        wwid \"${XM_WWID[k]}\"
        alias ${XM_ALIAS[k]}
    }
}"
    done
}

# after the wwids and bindings files are written
maps_wwids() {
    local k
    for ((k = 2; k <= NMAPS; k++)); do
        printf '/%s/\n' "${XM_WWID[k]}" >>/etc/multipath/wwids &&
            printf '%s %s\n' "${XM_ALIAS[k]}" "${XM_WWID[k]}" >>/etc/multipath/bindings ||
            die "cannot add ${XM_ALIAS[k]} to /etc/multipath/wwids and bindings"
    done
}

# after TARGETS, INITIATORS and BACKSTORES are set: map k's paths are
# XM_IDX[k] and XM_IDX[k]+1, its node-2 nexus XM_IDX[k]+2; XM_WANT[i] is the
# WWID path i must report
maps_targets() {
    local k h i
    for ((k = 2; k <= NMAPS; k++)); do
        XM_IDX[k]=${#TARGETS[@]} h=${XM_HEX:k:1}
        TARGETS+=("naa.50014050000${h}f0a1" "naa.50014050000${h}f0a2")
        INITIATORS+=("naa.50014050000${h}a001" "naa.50014050000${h}a002")
        BACKSTORES+=("fileio_$((k + 8))/mp$k" "fileio_$((k + 8))/mp$k")
        if [[ $XM_N2 == 1 ]]; then
            TARGETS+=("naa.50014050000${h}f0c1") INITIATORS+=("naa.50014050000${h}c001")
            BACKSTORES+=("fileio_$((k + 8))/mp$k")
        fi
        for ((i = XM_IDX[k]; i < ${#TARGETS[@]}; i++)); do XM_WANT[i]=${XM_WWID[k]}; done
    done
}

# after the other backstores are enabled
maps_backstores() {
    local k b
    for ((k = 2; k <= NMAPS; k++)); do
        b=$CFG/core/fileio_$((k + 8))/mp$k
        mkdir -p "$b" || die "cannot create the backstore $b"
        put "fd_dev_name=$LIO_FILES/mp$k.img,fd_dev_size=$((16 * 1024 * 1024))" "$b/control"
        put "${XM_SERIAL[k]}" "$b/wwn/vpd_unit_serial"
        put 1 "$b/enable"
    done
}

# after node 2's udev rule is written (HOSTS known), before udevd starts
maps_udev_rules() {
    local k w
    [[ $XM_N2 == 1 ]] || return 0
    for ((k = 2; k <= NMAPS; k++)); do
        w=reservd-vm-node2-${XM_WWID[k]}
        printf '%s\n' "ACTION!=\"remove\", SUBSYSTEM==\"block\", KERNEL==\"sd*[!0-9]\", KERNELS==\"host${HOSTS[XM_IDX[k] + 2]}\", ENV{ID_SERIAL}=\"$w\", ENV{ID_SERIAL_SHORT}=\"$w\", ENV{RESERVD_VM_NODE}=\"2\"" \
            >>/etc/udev/rules.d/59-reservd-vm-node2.rules || die "cannot write the node 2 udev rule"
    done
}

# after mpatha is ready: every map with its two paths, node 2 outside
maps_ready() {
    local k dm n i slaves
    for ((k = 2; k <= NMAPS; k++)); do
        [[ -n ${XM_DM[k]:-} ]] && continue
        i=${XM_IDX[k]}
        for dm in /sys/block/dm-*; do
            [[ -r $dm/dm/name ]] || continue
            read -r n <"$dm/dm/name"
            [[ $n == "${XM_ALIAS[k]}" ]] || continue
            [[ $XM_N2 == 1 && -e $dm/slaves/${SDS[i + 2]} ]] &&
                die "node 2's path ${SDS[i + 2]} joined ${XM_ALIAS[k]} (udev rule not applied?)"
            slaves=("$dm"/slaves/*)
            [[ ${#slaves[@]} == 2 && -e $dm/slaves/${SDS[i]} && -e $dm/slaves/${SDS[i + 1]} &&
                -b /dev/mapper/${XM_ALIAS[k]} ]] && XM_DM[k]=${dm##*/}
        done
        [[ -n ${XM_DM[k]:-} ]] || return 1
    done
}
maps_wait() { ((NMAPS == 1)) || wait_for 60 "the maps ${XM_ALIAS[*]}" maps_ready; }

# after udev settled, with multipathd's topology in $1
maps_check() {
    local k i devno line found
    for ((k = 2; k <= NMAPS; k++)); do
        [[ $1 == *"${XM_ALIAS[k]} (${XM_WWID[k]})"* ]] || die "multipathd does not show ${XM_ALIAS[k]}: $1"
        [[ $XM_N2 == 1 ]] || continue
        i=$((XM_IDX[k] + 2)) found=
        [[ $1 != *" ${SDS[i]} "* ]] || die "multipathd shows node 2's path ${SDS[i]}: $1"
        read -r devno <"/sys/block/${SDS[i]}/dev" || die "no dev for ${SDS[i]}"
        while read -r line; do
            [[ $line == "E:ID_SERIAL=reservd-vm-node2-${XM_WWID[k]}" ]] && found=1
        done <"/run/udev/data/b$devno"
        [[ -n $found ]] || die "udev did not give ${SDS[i]} (node 2, ${XM_ALIAS[k]}) its node-2 WWID"
    done
}

# with the scenario's environment, when RESERVD_VM_MAPS is set: every map,
# mpatha first; a map's paths joined by commas; "-" for no node-2 nexus
maps_export() {
    [[ -n ${RESERVD_VM_MAPS:-} ]] || return 0
    local k i n2sg n2init
    RESERVD_MAPS=$MP_ALIAS RESERVD_MAPS_WWIDS=$MP_WWID RESERVD_MAPS_DEVS=/dev/mapper/$MP_ALIAS
    RESERVD_MAPS_PATHS=/dev/${SDS[0]},/dev/${SDS[1]} RESERVD_MAPS_SGS=/dev/${SGS[0]},/dev/${SGS[1]}
    RESERVD_MAPS_INITIATORS=${INITIATORS[0]},${INITIATORS[1]}
    RESERVD_MAPS_N2_SGS=/dev/${SGS[3]} RESERVD_MAPS_N2_INITIATORS=${INITIATORS[3]}
    for ((k = 2; k <= NMAPS; k++)); do
        i=${XM_IDX[k]} n2sg=- n2init=-
        [[ $XM_N2 == 1 ]] && n2sg=/dev/${SGS[i + 2]} n2init=${INITIATORS[i + 2]}
        RESERVD_MAPS+=" ${XM_ALIAS[k]}" RESERVD_MAPS_WWIDS+=" ${XM_WWID[k]}"
        RESERVD_MAPS_DEVS+=" /dev/mapper/${XM_ALIAS[k]}"
        RESERVD_MAPS_PATHS+=" /dev/${SDS[i]},/dev/${SDS[i + 1]}"
        RESERVD_MAPS_SGS+=" /dev/${SGS[i]},/dev/${SGS[i + 1]}"
        RESERVD_MAPS_INITIATORS+=" ${INITIATORS[i]},${INITIATORS[i + 1]}"
        RESERVD_MAPS_N2_SGS+=" $n2sg" RESERVD_MAPS_N2_INITIATORS+=" $n2init"
    done
    export RESERVD_MAPS RESERVD_MAPS_WWIDS RESERVD_MAPS_DEVS RESERVD_MAPS_PATHS RESERVD_MAPS_SGS \
        RESERVD_MAPS_INITIATORS RESERVD_MAPS_N2_SGS RESERVD_MAPS_N2_INITIATORS
}
