#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages reservd needs.
#   scripts/deps.sh build   -- to build: libclang (bindgen), multipath-tools (mpath_persist.h)
#   scripts/deps.sh test    -- to build and run every test (adds QEMU, qemu-pr-helper,
#                              sg3-utils, busybox, kmod, cpio for the VM test bed,
#                              libiscsi-bin's iscsi-test-cu, debootstrap for the test
#                              bed's trixie and sid roots and the pr-helper image,
#                              podman, and the Debian and RPM packaging tools)
set -euo pipefail
want=(libclang-dev multipath-tools pkg-config)
if [ "${1:-build}" = test ]; then
    want+=(qemu-system-x86 qemu-system-common busybox-static cpio kmod sg3-utils udev systemd
           python3 xz-utils libiscsi-bin debootstrap podman debhelper dpkg-dev lintian rpm man-db)
fi
missing=()
for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "reservd: need root to install: ${missing[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo "installing: ${missing[*]}" >&2
apt-get -o DPkg::Lock::Timeout=600 update -qq
apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
