#!/bin/bash
# PID 1 of the reservd test VM with run-vm.sh --systemd, exec'd by the
# initramfs after switch_root (the whole / is a tmpfs overlay of the host's
# root, so packages can be installed).
#
# Writes the units of a short boot and exec's systemd as PID 1 with the
# target reservd-vm.target: sysinit.target and sockets.target as on any
# Debian system (journald, udevd, tmpfiles, the sockets of enabled units),
# and reservd-vm.service, which runs guest-init.sh (RVM_SYSTEMD=1): LIO,
# multipathd.service, the scenario, the power-off. Nothing of the host's
# multi-user.target is started.
#
# Left out of the boot, each for a reason:
#   systemd-udev-trigger.service  the coldplug of every device (about 10 s
#                                 under TCG); the SCSI disks appear after
#                                 udevd runs, so their events reach it anyway
#   multipathd.service            pulled by sysinit.target on the host, started
#                                 by guest-init.sh once multipath.conf exists
#   systemd-timesyncd, systemd-random-seed, systemd-pstore
#                                 nothing to do in a test VM
# The host's /etc/fstab names the host's disks: an empty one replaces it. A
# host that is a container leaves /.dockerenv in its root, which would make
# systemd take the VM for a container (and skip multipathd.service).
if (($$ != 1)); then
    echo "systemd-boot.sh is PID 1 of the test VM; run tests/vm/run-vm.sh --systemd instead" >&2
    exit 2
fi
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
HERE=${BASH_SOURCE[0]%/*}
XCHG=${rvm_xchg:-}

fail() {
    echo "systemd-boot: FATAL: $*"
    if [[ -n $XCHG && -d $XCHG ]]; then
        echo "systemd-boot: $*" >"$XCHG/setup-error"
        echo 125 >"$XCHG/status"
    fi
    echo o >/proc/sysrq-trigger
    sleep 10
}

[[ -n $XCHG ]] || fail "rvm_xchg missing from the kernel command line"
[[ -x /lib/systemd/systemd ]] || fail "no /lib/systemd/systemd in the root"
[[ -x $HERE/guest-init.sh ]] || fail "no $HERE/guest-init.sh"

U=/etc/systemd/system
mkdir -p "$U" || fail "cannot write $U"
for u in systemd-udev-trigger.service systemd-timesyncd.service systemd-random-seed.service \
         systemd-pstore.service; do
    ln -sf /dev/null "$U/$u"
done
rm -f "$U/sysinit.target.wants/multipathd.service"
printf '# the test VM mounts what it needs itself\n' >/etc/fstab
rm -f /.dockerenv /run/.containerenv
# (a container image's policy-rc.d forbids starting services from maintainer
# scripts: a booted system has none)
rm -f /usr/sbin/policy-rc.d
# the journal of this boot only (the host's files are no business of the guest)
rm -rf /var/log/journal
# systemd-tmpfiles-setup.service would empty /tmp at boot, where the host's
# files (and the exchange dir's mount point) are
mkdir -p /etc/tmpfiles.d && ln -sf /dev/null /etc/tmpfiles.d/tmp.conf
# dpkg's man-db trigger rebuilds the manual page index: minutes under TCG
rm -f /var/lib/man-db/auto-update

cat >"$U/reservd-vm.target" <<EOF
[Unit]
Description=reservd test VM
Requires=sysinit.target reservd-vm.service
Wants=sockets.target
After=sysinit.target sockets.target
AllowIsolate=yes
EOF
cat >"$U/reservd-vm.service" <<EOF
[Unit]
Description=reservd test VM: LIO disks, multipath, the scenario
DefaultDependencies=no
Wants=systemd-journald.socket systemd-udevd.service
After=systemd-journald.socket systemd-udevd.service

[Service]
Type=exec
ExecStart=$HERE/guest-init.sh
Environment=RVM_SYSTEMD=1 rvm_xchg=$XCHG
StandardInput=null
StandardOutput=journal+console
TimeoutStartSec=infinity
KillMode=process
EOF

exec /lib/systemd/systemd --unit=reservd-vm.target --show-status=no
