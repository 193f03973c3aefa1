#!/bin/sh
# /init of the reservd test VM's busybox initramfs (built by tests/vm/run-vm.sh).
#
# Loads the 9p/virtio/overlay modules, mounts the host's / (read-only 9p) on
# /newroot, puts tmpfs overlays on the writable dirs, mounts the module share
# and the read-write exchange share, then switch_root's into $rvm_init
# (tests/vm/guest-init.sh). rvm_xchg and rvm_init come from the kernel command
# line. Any failure writes a status and powers the guest off.
#
# With rvm_root=overlay (a Debian release's root instead of the host's), the
# whole / is an overlay of that root (read-only 9p) and a tmpfs, so mount points
# for the host paths can be made anywhere, and the host dirs in rvm_shares
# (comma-separated; 9p tags rvmshare0, rvmshare1, ...) are mounted read-only at
# their host paths.
[ $$ = 1 ] || { echo "initramfs-init.sh only runs as PID 1 of the test VM" >&2; exit 2; }
export PATH=/bin
R=/newroot

fail() {
    echo "initramfs: FATAL: $*"
    if [ -n "$xchg_ok" ]; then
        echo "initramfs: $*" >"$R$rvm_xchg/setup-error"
        echo 125 >"$R$rvm_xchg/status"
    fi
    echo o >/proc/sysrq-trigger
    sleep 10
    poweroff -f
}

mount -t devtmpfs devtmpfs /dev
[ -c /dev/console ] && exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
if [ -z "$rvm_xchg" ] || [ -z "$rvm_init" ]; then
    fail "rvm_xchg/rvm_init missing from the kernel command line"
fi

for m in /modules/*.ko; do
    insmod "$m" || fail "insmod $m"
done

NINEP=trans=virtio,version=9p2000.L,msize=512000
: "${rvm_root:=}" "${rvm_shares:=}"   # optional, from the kernel command line
if [ "$rvm_root" = overlay ]; then
    mkdir -p /lower /rw
    mount -t 9p -o $NINEP,ro,cache=loose rvmroot /lower || fail "cannot mount the root (9p tag rvmroot)"
    mount -t tmpfs -o mode=0755,size=50% tmpfs /rw || fail "tmpfs for the root overlay"
    mkdir -p /rw/upper /rw/work
    mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work $R ||
        fail "overlay on /"
    mkdir -p $R/run $R/usr/lib/modules "$R$rvm_xchg" || fail "cannot make the mount points"
    mount -t tmpfs -o mode=0755,size=30% tmpfs $R/run || fail "tmpfs on /run"
    i=0
    IFS=,
    for d in $rvm_shares; do
        if ! { mkdir -p "$R$d" && mount -t 9p -o "$NINEP,ro,cache=loose" "rvmshare$i" "$R$d"; }; then
            fail "cannot mount the host's $d (9p tag rvmshare$i)"
        fi
        i=$((i + 1))
    done
    unset IFS
    dirs=
else
    mount -t 9p -o $NINEP,ro,cache=loose rvmroot $R ||
        fail "cannot mount the host root (9p tag rvmroot)"
    mount -t tmpfs -o mode=0755,size=80% tmpfs $R/run || fail "tmpfs on /run"
    # Writable dirs: tmpfs-backed overlays over the read-only host dirs. The upper
    # and work dirs live on the /run tmpfs.
    dirs=
    for d in etc var tmp root home; do
        [ -d $R/$d ] && dirs="$dirs $d"
    done
fi
mkdirs=
for d in $dirs; do mkdirs="$mkdirs $R/run/rvm-overlay/$d/upper $R/run/rvm-overlay/$d/work"; done
# shellcheck disable=SC2086  # word splitting wanted
mkdir -p $mkdirs /dev/pts /dev/shm
for d in $dirs; do
    mount -t overlay overlay \
        -o "lowerdir=$R/$d,upperdir=$R/run/rvm-overlay/$d/upper,workdir=$R/run/rvm-overlay/$d/work" "$R/$d" ||
        fail "overlay on /$d"
done
chmod 1777 $R/tmp
# the host keeps an empty /usr/lib/modules as mount point for the kernel's modules
mount -t 9p -o $NINEP,ro,cache=loose rvmmods $R/usr/lib/modules ||
    fail "cannot mount the module share on /usr/lib/modules"
[ -d "$R$rvm_xchg" ] || fail "exchange dir $rvm_xchg not visible in the guest"
mount -t 9p -o $NINEP rvmxchg "$R$rvm_xchg" ||
    fail "cannot mount the exchange share on $rvm_xchg"
xchg_ok=1

ln -s /proc/self/fd /dev/fd
ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout
ln -s /proc/self/fd/2 /dev/stderr
mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
ip link set lo up
hostname reservd-vm

[ -x "$R$rvm_init" ] || fail "guest init $rvm_init is not executable in the guest"
for d in dev proc sys; do
    mount -o move /$d $R/$d || fail "cannot move /$d into the new root"
done
exec switch_root $R "$rvm_init"
