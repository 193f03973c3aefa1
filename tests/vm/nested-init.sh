#!/bin/sh
# /init of the nested guest: a Linux guest that a scenario boots with QEMU
# inside the test VM (run-vm.sh --nested builds its initramfs: busybox,
# sg_persist, the modules of a virtio-scsi disk).
#
# Loads the modules, waits for the disks, then serves commands on the second
# serial port (ttyS1, raw): each line it reads is run by sh, its output
# follows, then a line "@@END <exit status>". "@@QUIT" (or the end of input)
# reboots, which ends QEMU (-no-reboot). The kernel's console is ttyS0.
#
# Kernel command line: nested_disks=N (how many SCSI disks to wait for).
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
for m in /modules/*.ko; do
    insmod "$m" || echo "nested-init: insmod $m failed"
done
n=0
want=${nested_disks:-1}
while :; do
    set -- /sys/block/sd*
    [ -e "$1" ] && [ $# -ge "$want" ] && break
    n=$((n + 1))
    [ $n -le 600 ] || break
    sleep 0.1
done
stty -F /dev/ttyS1 raw -echo 115200 || echo "nested-init: stty on ttyS1 failed"
exec </dev/ttyS1 >/dev/ttyS1 2>&1
read -r up _ </proc/uptime
echo "@@READY uptime=$up disks=$(ls /sys/block | grep -c '^sd')"
while IFS= read -r line; do
    [ "$line" = @@QUIT ] && break
    sh -c "$line"
    echo "@@END $?"
done
reboot -f
