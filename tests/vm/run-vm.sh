#!/bin/bash
# reservd end-to-end test bed, host side.
#
# Boots Debian's own kernel under QEMU (TCG) with the host's root filesystem as
# the guest's userspace (read-only 9p + tmpfs overlays), sets up LIO/tcm_loop
# SCSI disks and dm-multipath inside the guest (tests/vm/guest-init.sh) and runs
# SCENARIO there. See tests/vm/README.md.
#
# Usage: tests/vm/run-vm.sh [--timeout SECS] [--release NAME] [--systemd] [--nested]
#                           SCENARIO [ARGS...]
#        tests/vm/run-vm.sh [--release NAME] --prepare   (install + kernel + initramfs
#                                                         [+ root] only)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
CACHE=${RESERVD_VM_CACHE:-/var/cache/reservd-vm}
TIMEOUT=${RESERVD_VM_TIMEOUT:-600}
PREPARE_ONLY=0
RELEASE=${RESERVD_VM_RELEASE:-bookworm}
REPO=$(cd "$HERE/../.." && pwd -P)

# Debian packages the bed needs on the host (the guest runs the host's userspace).
PACKAGES=(qemu-system-x86 busybox-static cpio kmod multipath-tools sg3-utils udev)
# Modules the initramfs loads (their dependencies are resolved with modprobe).
INITRD_MODULES=(virtio_pci 9pnet_virtio 9p overlay)
GUEST_INIT=$HERE/guest-init.sh
# --systemd: systemd is PID 1 and runs guest-init.sh as a unit
SYSTEMD_INIT=$HERE/systemd-boot.sh
SYSTEMD=0
# --nested: an initramfs for a guest inside the guest (QEMU in the VM), with
# busybox, these programs and the modules of a virtio-scsi disk
NESTED=0
NESTED_INIT=$HERE/nested-init.sh
NESTED_MODULES=(virtio_pci virtio_scsi sd_mod sg)
NESTED_PROGRAMS=(sg_persist)
INITRD_INIT=$HERE/initramfs-init.sh
# Userspace roots of other Debian releases (debootstrap --variant=minbase plus
# these): what guest-init.sh and the scenarios run, qemu-pr-helper
# (qemu-system-common) and iscsi-test-cu (libiscsi-bin) as baselines, systemd,
# podman (the kubevirt scenario's container runtime).
ROOT_PACKAGES=(multipath-tools sg3-utils udev kmod procps python3 qemu-system-common
               libiscsi-bin systemd podman)
ROOT_MAX_AGE_DAYS=7

log() { printf '[run-vm] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 2; }

usage() {
    cat <<EOF
usage: ${0##*/} [--timeout SECS] [--release NAME] [--systemd] [--nested] SCENARIO [ARGS...]
       ${0##*/} [--release NAME] --prepare

Runs SCENARIO (an executable on the host; the guest sees the host's / read-only)
as root inside a QEMU guest with LIO SCSI disks and dm-multipath set up.
--release bookworm (default) boots the host's own root; trixie or sid boot a
Debian root of that release (built with debootstrap, cached), with the
repository shared at its host path. --systemd boots systemd as PID 1 on a
writable overlay of the root (packages can be installed); the disks are set up
by a unit. --nested also prepares (cached) an initramfs for a guest that the
scenario boots with QEMU inside the VM (RESERVD_VM_NESTED_KERNEL and
RESERVD_VM_NESTED_INITRD name the kernel and the initramfs).
Exits with the scenario's status; 124 on timeout, 125 when the guest setup
failed or the guest died without reporting a status, 2 on harness errors.

Environment:
  RESERVD_VM_CACHE      cache dir for the kernel and initramfs (default /var/cache/reservd-vm)
  RESERVD_VM_TIMEOUT    default for --timeout (default 600)
  RESERVD_VM_VERBOSE=1  stream the guest console to stderr while it runs
  RESERVD_VM_KEEP=1     keep the per-run work dir (console log, exchange dir)
  RESERVD_VM_SAVE_DIR   copy the console log and the exchange dir there after the run
  RESERVD_VM_PASS_ENV   extra variable names to pass into the guest (RESERVD_* and RUST_*
                        variables are always passed)
  RESERVD_VM_QEMU_ARGS  extra QEMU arguments (word-split)
  RESERVD_VM_RELEASE    default for --release (bookworm)
  RESERVD_VM_MIRROR     Debian mirror for the roots (default: the host's, else deb.debian.org)
  RESERVD_VM_SHARE      more host dirs to share at their paths with a release's root
EOF
}

# ---- timing helpers (EPOCHREALTIME, microseconds) ------------------------------
now_us() { local t=$EPOCHREALTIME; printf '%s' "${t/./}"; }
fmt_us() { printf '%d.%02ds' $(( $1 / 1000000 )) $(( ($1 % 1000000) / 10000 )); }
PHASE_T0=0
SUMMARY=()
phase_begin() { PHASE_T0=${EPOCHREALTIME/./}; }
phase_end() {
    local d=$(( ${EPOCHREALTIME/./} - PHASE_T0 ))
    SUMMARY+=("$1=$(fmt_us "$d")")
    log "phase $1: $(fmt_us "$d")${2:+ ($2)}"
}
# host mtime of a file, in microseconds (files in the exchange dir are created
# by QEMU's 9p server, so their mtime is host time)
# console text without carriage returns and the firmware's terminal escapes
strip_console() { sed -u -e 's/\r//g' -e 's/\x1b\[[0-9;?]*[A-Za-z]//g' -e 's/\x1b[a-z]//g'; }
mtime_us() { local t; t=$(stat -c '%.6Y' "$1") && printf '%s' "${t/./}"; }

# ---- arguments -----------------------------------------------------------------
while (($#)); do
    case $1 in
        --timeout) (($# >= 2)) || die "--timeout needs a value"; TIMEOUT=$2; shift 2 ;;
        --timeout=*) TIMEOUT=${1#*=}; shift ;;
        --prepare) PREPARE_ONLY=1; shift ;;
        --release) (($# >= 2)) || die "--release needs a value"; RELEASE=$2; shift 2 ;;
        --release=*) RELEASE=${1#*=}; shift ;;
        --systemd) SYSTEMD=1; shift ;;
        --nested) NESTED=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        -*) usage >&2; die "unknown option: $1" ;;
        *) break ;;
    esac
done
[[ $TIMEOUT =~ ^[0-9]+$ && $TIMEOUT -gt 0 ]] || die "bad timeout: $TIMEOUT"
case $RELEASE in
    bookworm|trixie|sid) ;;
    *) die "unknown release '$RELEASE' (bookworm, trixie or sid)" ;;
esac
[[ $RELEASE != bookworm ]] && PACKAGES+=(debootstrap)
# --systemd on the host's root boots the host's systemd (a release's root has its own)
((SYSTEMD)) && [[ $RELEASE == bookworm ]] && PACKAGES+=(systemd)
# (the nested guest's kernel and initramfs are read from the cache, which only
# the host's root shows)
((NESTED == 0)) || [[ $RELEASE == bookworm ]] || die "--nested needs the host's root (bookworm)"
if ((PREPARE_ONLY == 0)); then
    (($# >= 1)) || { usage >&2; exit 2; }
    SCENARIO=$1; shift
    if [[ $SCENARIO != */* ]]; then
        SCENARIO=$(type -P -- "$SCENARIO") || die "scenario not found in PATH: $1"
    fi
    SCENARIO=$(readlink -f -- "$SCENARIO") || die "scenario not found: $SCENARIO"
    [[ -f $SCENARIO && -x $SCENARIO ]] || die "scenario is not an executable file: $SCENARIO"
    case $SCENARIO in
        /run/*|/proc/*|/sys/*|/dev/*|/usr/lib/modules/*)
            die "scenario must live in a path the guest shares with the host, not $SCENARIO" ;;
    esac
fi
[[ -x $GUEST_INIT && -f $INITRD_INIT ]] || die "missing $GUEST_INIT or $INITRD_INIT"

# ---- phase: install ------------------------------------------------------------
ensure_packages() {
    local -A ok=()
    local p st missing=()
    while read -r p st; do
        [[ $st == ii ]] && ok[$p]=1
    done < <(dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n' "${PACKAGES[@]}" 2>/dev/null || true)
    for p in "${PACKAGES[@]}"; do [[ -n ${ok[$p]:-} ]] || missing+=("$p"); done
    if ((${#missing[@]})); then
        ((EUID == 0)) || die "packages missing (${missing[*]}) and not root"
        log "installing: ${missing[*]}"
        local out
        out=$(mktemp)
        export DEBIAN_FRONTEND=noninteractive
        if ! { apt-get -q -o DPkg::Lock::Timeout=600 update &&
               apt-get -q -y -o DPkg::Lock::Timeout=600 install --no-install-recommends "${PACKAGES[@]}"
             } >"$out" 2>&1; then
            cat "$out" >&2; rm -f "$out"; die "apt-get failed"
        fi
        rm -f "$out"
    fi
    local c
    for c in qemu-system-x86_64 busybox cpio depmod modprobe multipathd mpathpersist sg_persist \
             udevadm flock timeout stat; do
        type -P "$c" >/dev/null || die "command not found after install: $c"
    done
    [[ -x /lib/systemd/systemd-udevd ]] || die "/lib/systemd/systemd-udevd missing"
    ((SYSTEMD == 0)) || [[ $RELEASE != bookworm || -x /lib/systemd/systemd ]] ||
        die "/lib/systemd/systemd missing"
    [[ $RELEASE == bookworm ]] || type -P debootstrap >/dev/null || die "debootstrap missing after install"
    # mount point for the guest's module share (the guest's / is the host's /, read-only)
    [[ -d /usr/lib/modules ]] || mkdir -p /usr/lib/modules
}

# ---- phase: kernel ------------------------------------------------------------
KDIR='' KVER='' KMODS='' VMLINUX=''
resolve_kernel_pkg() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}
extract_vmlinux() {   # bzImage -> uncompressed ELF vmlinux (PVH entry point)
    local src=$1 dst=$2 py
    py=$(type -P /usr/bin/python3 python3 | head -n1) || true
    if [[ -n $py ]] && "$py" -c 'import lzma' 2>/dev/null; then
        "$py" - "$src" "$dst" <<'PY'
import lzma, sys
data = open(sys.argv[1], "rb").read()
off = data.find(b"\xfd7zXZ\x00")
while off >= 0:
    try:
        out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[off:])
    except lzma.LZMAError:
        out = b""
    if out[:4] == b"\x7fELF":
        open(sys.argv[2], "wb").write(out)
        sys.exit(0)
    off = data.find(b"\xfd7zXZ\x00", off + 1)
sys.exit("no XZ-compressed ELF image found in " + sys.argv[1])
PY
    else
        local off
        for off in $(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$src" | cut -d: -f1); do
            tail -c "+$((off + 1))" "$src" | xz -dc --single-stream >"$dst" 2>/dev/null || true
            [[ $(head -c4 "$dst" | od -An -tx1 | tr -d ' \n') == 7f454c46 ]] && return 0
        done
        return 1
    fi
}
apt_lists_stamp() {
    stat -c '%n %Y %s' /var/lib/apt/lists/*Packages* 2>/dev/null | sha256sum | cut -c1-16
}
ensure_kernel() {
    local pkg='' ver='' s key tmp deb stamp memo=$CACHE/kernel-package
    # apt-cache takes ~1 s: remember its answer until the apt lists change
    stamp=$(apt_lists_stamp)
    [[ -r $memo ]] && read -r s pkg ver <"$memo" && [[ $s == "$stamp" && -n $ver ]] || pkg=
    if [[ -z $pkg ]]; then
        pkg=$(resolve_kernel_pkg)
        if [[ -z $pkg ]]; then
            log "linux-image-amd64 unknown to apt, running apt-get update"
            apt-get -q -o DPkg::Lock::Timeout=600 update >/dev/null 2>&1 || true
            pkg=$(resolve_kernel_pkg)
            stamp=$(apt_lists_stamp)
        fi
        if [[ -n $pkg ]]; then
            ver=$(apt-cache show --no-all-versions "$pkg" 2>/dev/null | awk '/^Version:/ { print $2; exit }')
            [[ -n $ver ]] && printf '%s %s %s\n' "$stamp" "$pkg" "$ver" >"$memo"
        fi
    fi
    if [[ -n $pkg && -n $ver ]]; then
        key=${pkg}_${ver//:/%}
    else
        # offline fallback: newest complete cached kernel
        # shellcheck disable=SC2012
        key=$(ls -t "$CACHE"/kernels/*/.complete 2>/dev/null | head -n1 | xargs -r dirname | xargs -r basename)
        [[ -n $key ]] || die "cannot resolve linux-image-amd64 and no cached kernel"
        log "warning: apt cannot resolve linux-image-amd64, using cached $key"
    fi
    KDIR=$CACHE/kernels/$key
    if [[ ! -e $KDIR/.complete ]]; then
        log "downloading and unpacking $pkg $ver"
        tmp=$KDIR.tmp
        rm -rf "$tmp"; mkdir -p "$tmp/deb"
        (cd "$tmp/deb" && apt-get -q -o APT::Sandbox::User=root download "$pkg=$ver" >/dev/null) ||
            die "apt-get download $pkg=$ver failed"
        deb=$(printf '%s\n' "$tmp"/deb/*.deb | head -n1)
        dpkg -x "$deb" "$tmp/root"
        rm -rf "$tmp/deb" "$tmp/root/usr/share/doc"
        # the package may ship /lib/modules or /usr/lib/modules
        if [[ ! -d $tmp/root/lib/modules && -d $tmp/root/usr/lib/modules ]]; then
            ln -s usr/lib "$tmp/root/lib"
        fi
        KVER=$(ls "$tmp/root/lib/modules")
        [[ -n $KVER && $KVER != *$'\n'* ]] || die "unexpected modules dirs in $pkg: $KVER"
        depmod -b "$tmp/root" "$KVER"
        extract_vmlinux "$tmp/root/boot/vmlinuz-$KVER" "$tmp/vmlinux" ||
            die "could not extract vmlinux from vmlinuz-$KVER"
        printf '%s\n' "$KVER" >"$tmp/kver"
        touch "$tmp/.complete"
        rm -rf "$KDIR"; mv "$tmp" "$KDIR"
    fi
    touch "$KDIR/.last-used"
    KVER=$(<"$KDIR/kver")
    KMODS=$(readlink -f "$KDIR/root/lib/modules")
    VMLINUX=$KDIR/vmlinux
    # drop kernels nobody used for a week
    find "$CACHE/kernels" -mindepth 2 -maxdepth 2 -name .last-used -mtime +7 -printf '%h\n' 2>/dev/null |
        while read -r d; do [[ $d == "$KDIR" ]] || rm -rf "$d"; done
}

# ---- phase: initramfs ------------------------------------------------------------
INITRD=
build_initramfs() {   # $1 = output file
    local out=$1 d line mod n=0 a
    d=$(mktemp -d "$CACHE/initramfs-build.XXXXXX")
    mkdir -p "$d"/{bin,dev,proc,sys,newroot,modules}
    cp /bin/busybox "$d/bin/busybox"
    for a in $(/bin/busybox --list); do
        [[ $a == busybox ]] || ln -s busybox "$d/bin/$a"
    done
    # modules in dependency order, decompressed (busybox insmod wants plain .ko)
    while read -r line mod _; do
        [[ $line == insmod ]] || continue
        n=$((n + 1))
        a=${mod##*/}; a=${a%%.ko*}
        case $mod in
            *.ko.xz) xz -dc "$mod" ;;
            *.ko.zst) zstd -dc "$mod" ;;
            *.ko.gz) gzip -dc "$mod" ;;
            *) cat "$mod" ;;
        esac >"$d/modules/$(printf '%02d' "$n")-$a.ko"
    done < <(modprobe -d "$KDIR/root" -S "$KVER" -a --show-depends "${INITRD_MODULES[@]}" | awk '!seen[$0]++')
    ((n > 0)) || die "no modules resolved for the initramfs"
    install -m 0755 "$INITRD_INIT" "$d/init"
    mknod -m 0600 "$d/dev/console" c 5 1 2>/dev/null || true
    (cd "$d" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) >"$out.tmp"
    mv "$out.tmp" "$out"
    rm -rf "$d"
}
ensure_initramfs() {
    local hash
    hash=$({
        printf '%s\n' "$KDIR" "$KVER" "${INITRD_MODULES[@]}"
        sha256sum </bin/busybox
        sha256sum <"$INITRD_INIT"
        declare -f build_initramfs
    } | sha256sum | cut -c1-16)
    INITRD=$CACHE/initramfs-$hash.cpio
    if [[ ! -s $INITRD ]]; then
        build_initramfs "$INITRD"
        REBUILT=1
    fi
    touch "$INITRD"
    find "$CACHE" -maxdepth 1 -name 'initramfs-*.cpio' ! -name "${INITRD##*/}" -mmin +60 -delete 2>/dev/null || true
}

# ---- phase: nested initramfs (--nested) ----------------------------------------------
# The guest inside the guest runs under TCG inside TCG (about 60 times slower
# than this VM), so its initramfs is small and uncompressed, and its modules
# lose their signatures: each insmod then skips an RSA verification (seconds
# each; the kernel notes that it is tainted).
NESTED_INITRD=
strip_module_signature() {   # $1 = .ko file, in place
    local f=$1 size siglen
    [[ $(tail -c 28 "$f") == '~Module signature appended~' ]] || return 0
    size=$(stat -c %s "$f")
    # struct module_signature (12 bytes) before the marker: sig_len, big-endian, last
    siglen=$(tail -c 40 "$f" | head -c 12 | od -An -tu1 -j8 -N4 |
        awk '{ print $1 * 16777216 + $2 * 65536 + $3 * 256 + $4 }')
    truncate -s $((size - 40 - siglen)) "$f"
}
build_nested_initramfs() {   # $1 = output file
    local out=$1 d line mod n=0 a p lib
    d=$(mktemp -d "$CACHE/nested-build.XXXXXX")
    mkdir -p "$d"/{bin,dev,proc,sys,modules}
    cp /bin/busybox "$d/bin/busybox"
    for a in $(/bin/busybox --list); do
        [[ $a == busybox ]] || ln -s busybox "$d/bin/$a"
    done
    for p in "${NESTED_PROGRAMS[@]}"; do
        p=$(type -P "$p") || { rm -rf "$d"; die "$p not found for the nested initramfs"; }
        cp "$p" "$d/bin/"
        # its shared libraries and the loader, at their paths
        for lib in $(ldd "$p" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
            mkdir -p "$d${lib%/*}"
            cp -L "$lib" "$d$lib"
        done
    done
    while read -r line mod _; do
        [[ $line == insmod ]] || continue
        n=$((n + 1))
        a=${mod##*/}; a=${a%%.ko*}
        case $mod in
            *.ko.xz) xz -dc "$mod" ;;
            *.ko.zst) zstd -dc "$mod" ;;
            *.ko.gz) gzip -dc "$mod" ;;
            *) cat "$mod" ;;
        esac >"$d/modules/$(printf '%02d' "$n")-$a.ko"
        strip_module_signature "$d/modules/$(printf '%02d' "$n")-$a.ko"
    done < <(modprobe -d "$KDIR/root" -S "$KVER" -a --show-depends "${NESTED_MODULES[@]}" | awk '!seen[$0]++')
    ((n > 0)) || die "no modules resolved for the nested initramfs"
    install -m 0755 "$NESTED_INIT" "$d/init"
    mknod -m 0600 "$d/dev/console" c 5 1 2>/dev/null || true
    (cd "$d" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) >"$out.tmp"
    mv "$out.tmp" "$out"
    rm -rf "$d"
}
ensure_nested_initramfs() {
    local hash p
    hash=$({
        printf '%s\n' "$KDIR" "$KVER" "${NESTED_MODULES[@]}" "${NESTED_PROGRAMS[@]}"
        sha256sum </bin/busybox
        for p in "${NESTED_PROGRAMS[@]}"; do sha256sum <"$(type -P "$p")"; done
        sha256sum <"$NESTED_INIT"
        declare -f build_nested_initramfs strip_module_signature
    } | sha256sum | cut -c1-16)
    NESTED_INITRD=$CACHE/nested-initramfs-$hash.cpio
    if [[ ! -s $NESTED_INITRD ]]; then
        build_nested_initramfs "$NESTED_INITRD"
        REBUILT=1
    fi
    touch "$NESTED_INITRD"
    find "$CACHE" -maxdepth 1 -name 'nested-initramfs-*.cpio' ! -name "${NESTED_INITRD##*/}" -mtime +7 \
        -delete 2>/dev/null || true
}

# ---- phase: root (releases other than the host's) ----------------------------------
# $CACHE/roots/RELEASE-KEY-EPOCH/{root/,.complete,mpath-version,.lock}: KEY
# changes with the package list and the build recipe, EPOCH is the build time.
# A root older than ROOT_MAX_AGE_DAYS is built again (sid moves); the old one
# goes once no run holds its .lock (runs take it shared while they boot it).
ROOTDIR='' ROOT_NOTE='' ROOT_LOCKFD=''
debian_mirror() {
    local uri='' f line
    if [[ -n ${RESERVD_VM_MIRROR:-} ]]; then printf '%s' "$RESERVD_VM_MIRROR"; return; fi
    f=/etc/apt/sources.list.d/debian.sources
    if [[ -r $f ]]; then
        while read -r line; do
            [[ $line == URIs:* ]] || continue
            for uri in ${line#URIs:}; do
                [[ $uri == *security* ]] || { printf '%s' "$uri"; return; }
            done
        done <"$f"
    fi
    if [[ -r /etc/apt/sources.list ]]; then
        uri=$(awk '$1 == "deb" && $2 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:/) { print $i; exit } }' /etc/apt/sources.list)
        [[ -n $uri ]] && { printf '%s' "$uri"; return; }
    fi
    printf '%s' http://deb.debian.org/debian
}
build_root() {   # $1 = release, $2 = output dir (root/ inside it)
    local rel=$1 out=$2 mirror log pkgs
    mirror=$(debian_mirror)
    pkgs=$(IFS=,; printf '%s' "${ROOT_PACKAGES[*]}")
    log "building the $rel root: debootstrap --variant=minbase $rel from $mirror (about a minute)"
    mkdir -p "$out"
    log=$out/debootstrap.log
    if ! debootstrap --variant=minbase --include="$pkgs" "$rel" "$out/root" "$mirror" >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        [[ -r $out/root/debootstrap/debootstrap.log ]] && tail -n 30 "$out/root/debootstrap/debootstrap.log" >&2
        return 1
    fi
    # what the guest never reads: package files, docs, translations
    rm -rf "$out/root/var/cache/apt/archives/"*.deb "$out/root/usr/share/doc" \
        "$out/root/usr/share/locale" "$out/root/usr/share/man" "$out/root/var/lib/apt/lists/"*_Packages
    # mount point of the guest's module share (the guest's / is an overlay, but
    # a real dir keeps the 9p lookups simple)
    mkdir -p "$out/root/usr/lib/modules"
    dpkg-query --admindir="$out/root/var/lib/dpkg" -W -f='${Version}' multipath-tools >"$out/mpath-version" ||
        return 1
    printf '%s\n' "$rel" >"$out/release"
    : >"$out/.lock"
    touch "$out/.complete"
}
ensure_root() {
    local key d best='' t0 tmp age
    # builds run under the cache lock: a .build dir left now is from a dead run
    rm -rf "$CACHE/roots/.build-"*
    key=$({
        printf '%s\n' "$RELEASE" "${ROOT_PACKAGES[@]}"
        declare -f build_root
    } | sha256sum | cut -c1-12)
    mkdir -p "$CACHE/roots"
    # newest complete build of this key
    for d in "$CACHE/roots/$RELEASE-$key-"*; do
        [[ -e $d/.complete ]] || continue
        [[ -z $best || ${d##*-} -gt ${best##*-} ]] && best=$d
    done
    age=-1
    [[ -n $best ]] && age=$(( ($(date +%s) - ${best##*-}) / 86400 ))
    local build=0
    if [[ -z $best ]]; then
        build=1
    elif ((age >= ROOT_MAX_AGE_DAYS)) && [[ -z $(find "$best/.rebuild-failed" -mmin -60 2>/dev/null) ]]; then
        build=1   # (after a failed rebuild, an hour passes before the next try)
    fi
    if ((build)); then
        t0=$(date +%s)
        tmp=$(mktemp -d "$CACHE/roots/.build-$RELEASE.XXXXXX")
        if build_root "$RELEASE" "$tmp"; then
            mv "$tmp" "$CACHE/roots/$RELEASE-$key-$t0"
            best=$CACHE/roots/$RELEASE-$key-$t0
            ROOT_NOTE="built in $(( $(date +%s) - t0 )) s"
        else
            rm -rf "$tmp"
            [[ -n $best ]] || die "could not build the $RELEASE root (see above)"
            touch "$best/.rebuild-failed"
            log "warning: could not rebuild the $RELEASE root, using the one from $(date -d "@${best##*-}" +%F)"
            ROOT_NOTE="stale, rebuild failed"
        fi
    else
        ROOT_NOTE="cached, built $(date -d "@${best##*-}" '+%F %R')"
    fi
    ROOTDIR=$best
    # hold it shared while this run boots it; drop older builds nobody holds
    exec {ROOT_LOCKFD}<"$ROOTDIR/.lock"
    flock -s "$ROOT_LOCKFD"
    # older builds and other keys of this release
    for d in "$CACHE/roots/$RELEASE"-*; do
        [[ -d $d && $d != "$ROOTDIR" ]] || continue
        (flock -xn 9 && rm -rf "$d") 9<"$d/.lock" 2>/dev/null || true
    done
}

# ---- preparation (serialised between concurrent runs) --------------------------
mkdir -p "$CACHE"
exec {LOCKFD}>"$CACHE/.lock"
flock -w 1800 "$LOCKFD" || die "could not lock $CACHE/.lock"

phase_begin; ensure_packages; phase_end install
phase_begin; ensure_kernel; phase_end kernel "$KVER"
REBUILT=0
phase_begin; ensure_initramfs; phase_end initramfs "$( ((REBUILT)) && echo built || echo cached)"
if ((NESTED)); then
    REBUILT=0
    phase_begin; ensure_nested_initramfs; phase_end nested-initramfs "$( ((REBUILT)) && echo built || echo cached)"
fi
if [[ $RELEASE != bookworm ]]; then
    phase_begin; ensure_root; phase_end root "$RELEASE, $ROOT_NOTE"
fi
flock -u "$LOCKFD"
exec {LOCKFD}>&-

# the guest's multipath-tools: upstream version of the installed package
if [[ $RELEASE == bookworm ]]; then
    MPATH_VERSION=$(dpkg-query -W -f='${Version}' multipath-tools 2>/dev/null) || MPATH_VERSION=
    log "root: the host's (bookworm), multipath-tools $MPATH_VERSION"
else
    MPATH_VERSION=$(<"$ROOTDIR/mpath-version")
    log "root: $RELEASE ($ROOTDIR/root), multipath-tools $MPATH_VERSION"
fi
MPATH_VERSION=${MPATH_VERSION#*:}; MPATH_VERSION=${MPATH_VERSION%%-*}; MPATH_VERSION=${MPATH_VERSION%%+*}

if ((PREPARE_ONLY)); then
    log "prepared: kernel $KVER, vmlinux $VMLINUX, initramfs $INITRD${ROOTDIR:+, root $ROOTDIR/root}"
    exit 0
fi

# ---- per-run work dir and exchange dir --------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/reservd-vm-XXXXXXXX")
WORK=$(readlink -f "$WORK")
XCHG=$WORK/xchg
CONSOLE=$WORK/console.log
mkdir -p "$XCHG/logs"
chmod 0755 "$WORK"; chmod 1777 "$XCHG/logs"
[[ $XCHG =~ ^/[A-Za-z0-9_./-]+$ ]] || die "work dir path unusable on a kernel command line: $XCHG"
case $XCHG in /run/*|/proc/*|/sys/*|/dev/*|/usr/lib/modules/*) die "TMPDIR must not be under /run, /proc, /sys, /dev";; esac

QPID=
# shellcheck disable=SC2317  # invoked through the EXIT trap
cleanup() {
    local rc=$?
    if [[ -n $QPID ]] && kill -0 "$QPID" 2>/dev/null; then
        kill -TERM "$QPID" 2>/dev/null || true
        wait "$QPID" 2>/dev/null || true
    fi
    if [[ -n ${RESERVD_VM_SAVE_DIR:-} ]]; then
        { mkdir -p "$RESERVD_VM_SAVE_DIR" && cp -a "$CONSOLE" "$XCHG" "$RESERVD_VM_SAVE_DIR"/; } 2>/dev/null ||
            log "warning: could not save the run to $RESERVD_VM_SAVE_DIR"
    fi
    if [[ ${RESERVD_VM_KEEP:-0} == 1 ]]; then
        log "kept work dir $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# job description for guest-init: cwd, argv, forwarded environment
CWD=$(pwd -P)
case $CWD in /run|/run/*|/proc*|/sys*|/dev|/dev/*) CWD=/ ;; esac
{
    printf 'RVM_CWD=%q\n' "$CWD"
    printf 'RVM_TIMEOUT=%q\n' "$TIMEOUT"
    printf 'RVM_RELEASE=%q\n' "$RELEASE"
    printf 'RVM_MPATH_VERSION=%q\n' "$MPATH_VERSION"
    if ((NESTED)); then
        printf 'export RESERVD_VM_NESTED_KERNEL=%q\n' "$VMLINUX"
        printf 'export RESERVD_VM_NESTED_INITRD=%q\n' "$NESTED_INITRD"
    fi
    printf 'RVM_ARGV=('; printf '%q ' "$SCENARIO" "$@"; printf ')\n'
    while read -r name; do
        [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
        [[ -v $name ]] || continue
        printf 'export %s=%q\n' "$name" "${!name}"
    done < <({ compgen -e | grep -E '^(RESERVD_|RUST_)' || true; tr ' ' '\n' <<<"${RESERVD_VM_PASS_ENV:-}"; } | sort -u)
} >"$XCHG/job"

CMDLINE="console=ttyS0 panic=-1 loglevel=4 mitigations=off no_timer_check rvm_xchg=$XCHG"
if ((SYSTEMD)); then
    CMDLINE+=" rvm_init=$SYSTEMD_INIT"
    # the host's root as the lower layer of a whole-root overlay (a release's
    # root is one already): dpkg can install into /usr and /lib
    [[ $RELEASE == bookworm ]] && CMDLINE+=" rvm_root=overlay rvm_shares="
else
    CMDLINE+=" rvm_init=$GUEST_INIT"
fi
ROOT_FS=/ SHARES=()
if [[ $RELEASE != bookworm ]]; then
    # A release's root: the guest's / is an overlay (that root read-only, tmpfs
    # on top), and what the run needs from the host is shared read-only at its
    # host path: the repository (scripts, target/), the scenario, the cwd,
    # CARGO_TARGET_DIR and RESERVD_VM_SHARE.
    ROOT_FS=$ROOTDIR/root
    # (system dirs are the root's own: a scenario such as /usr/bin/true runs the
    # root's, and nothing shadows the root's /, /usr, /etc, /tmp, ...)
    for d in "$REPO" ${CARGO_TARGET_DIR:+"$CARGO_TARGET_DIR"} "${SCENARIO%/*}" "$(pwd -P)" \
             ${RESERVD_VM_SHARE:-}; do
        d=$(readlink -f -- "$d" 2>/dev/null) || continue
        [[ -d $d ]] || continue
        case $d in
            /|/tmp|/var|/root|/home|/opt|/srv|/mnt|/media|/usr|/usr/*|/bin|/bin/*|/sbin|/sbin/*|\
            /lib|/lib/*|/lib32*|/lib64*|/libx32*|/etc|/etc/*|/boot|/boot/*|/run|/run/*|/proc|/proc/*|\
            /sys|/sys/*|/dev|/dev/*) continue ;;
        esac
        [[ $d =~ ^/[A-Za-z0-9_./-]+$ ]] || die "cannot share $d with the guest (characters)"
        SHARES+=("$d")
    done
    # drop duplicates and dirs inside another share
    mapfile -t SHARES < <(printf '%s\n' "${SHARES[@]}" | LC_ALL=C sort -u |
        awk '{ for (i = 1; i <= n; i++) if (index($0 "/", kept[i] "/") == 1) next; kept[++n] = $0; print }')
    CMDLINE+=" rvm_root=overlay rvm_shares=$(IFS=,; printf '%s' "${SHARES[*]}")"
fi
# shellcheck disable=SC2054  # commas belong to QEMU option values
QEMU=(
    qemu-system-x86_64 -nodefaults -no-user-config -nographic -serial stdio
    -accel tcg,thread=multi -cpu max -smp 2 -m 2G -no-reboot
    -kernel "$VMLINUX" -initrd "$INITRD" -append "$CMDLINE"
    -fsdev "local,id=fsroot,path=$ROOT_FS,readonly=on,security_model=none,multidevs=remap"
    -device virtio-9p-pci,fsdev=fsroot,mount_tag=rvmroot
    -fsdev "local,id=fsmods,path=$KMODS,readonly=on,security_model=none"
    -device virtio-9p-pci,fsdev=fsmods,mount_tag=rvmmods
    -fsdev "local,id=fsxchg,path=$XCHG,security_model=none"
    -device virtio-9p-pci,fsdev=fsxchg,mount_tag=rvmxchg
)
for i in "${!SHARES[@]}"; do
    QEMU+=(-fsdev "local,id=fsshare$i,path=${SHARES[i]},readonly=on,security_model=none,multidevs=remap"
           -device "virtio-9p-pci,fsdev=fsshare$i,mount_tag=rvmshare$i")
done
# shellcheck disable=SC2206
[[ -n ${RESERVD_VM_QEMU_ARGS:-} ]] && QEMU+=(${RESERVD_VM_QEMU_ARGS})

log "booting $KVER on the $RELEASE root$( ((SYSTEMD)) && echo ' with systemd as PID 1')${SHARES[*]:+ (shared: ${SHARES[*]})}, scenario:$(printf ' %q' "$SCENARIO" "$@") (timeout ${TIMEOUT}s)"
BOOT_T0=$(now_us)
timeout -k 10 "$TIMEOUT" "${QEMU[@]}" </dev/null >"$CONSOLE" 2>&1 &
QPID=$!
VERBOSE=0
[[ ${RESERVD_VM_VERBOSE:-0} == 1 ]] && VERBOSE=1
if ((VERBOSE)); then
    # live: guest console on stderr, scenario output on stdout
    tail -n +1 -F --pid="$QPID" "$CONSOLE" 2>/dev/null | strip_console >&2 &
    tail -n +1 -F --pid="$QPID" "$XCHG/output" 2>/dev/null &
fi
QRC=0
wait "$QPID" || QRC=$?
QPID=
END_T=$(now_us)
((VERBOSE)) && { wait || true; }

# ---- results ---------------------------------------------------------------------
TIMED_OUT=0
((QRC == 124 || QRC == 137)) && TIMED_OUT=1

if [[ -e $XCHG/scenario-started ]]; then
    S0=$(mtime_us "$XCHG/scenario-started")
    SUMMARY+=("boot-to-scenario=$(fmt_us $((S0 - BOOT_T0)))")
    log "phase boot-to-scenario: $(fmt_us $((S0 - BOOT_T0)))"
    if [[ -e $XCHG/status ]]; then S1=$(mtime_us "$XCHG/status"); else S1=$END_T; fi
    SUMMARY+=("scenario=$(fmt_us $((S1 - S0)))")
    log "phase scenario: $(fmt_us $((S1 - S0)))"
    log "phase shutdown: $(fmt_us $((END_T - S1)))"
else
    log "phase boot (no scenario started): $(fmt_us $((END_T - BOOT_T0)))"
fi
[[ -s $XCHG/guest-timings ]] && log "guest setup: $(tr '\n' ' ' <"$XCHG/guest-timings")"

((VERBOSE == 0)) && [[ -e $XCHG/output ]] && cat "$XCHG/output"

RC=0 WHY=
if ((TIMED_OUT)); then
    RC=124; WHY="TIMEOUT: guest killed after ${TIMEOUT}s"
elif [[ ! -e $XCHG/status ]]; then
    RC=125; WHY="guest exited without reporting a status (qemu exit $QRC)"
else
    RC=$(tr -dc '0-9' <"$XCHG/status")
    if [[ -z $RC ]]; then RC=125; WHY="unreadable status file"; fi
    RC=$((10#$RC)); ((RC <= 255)) || RC=125
    ((RC == 0)) || WHY="scenario exited with status $RC"
fi
[[ -s $XCHG/setup-error ]] && WHY="guest setup failed: $(<"$XCHG/setup-error")"
if [[ -s $XCHG/scenario-timeout ]]; then RC=124; WHY=$(<"$XCHG/scenario-timeout"); fi

if ((RC != 0)); then
    {
        echo "=================== reservd-vm: FAILED: $WHY"
        echo "------------------- guest console (last 80 lines)"
        tail -n 80 "$CONSOLE" | strip_console
        shopt -s nullglob
        for f in "$XCHG"/logs/* "$XCHG"/logs/*/*; do
            [[ -f $f ]] || continue
            echo "------------------- ${f#"$XCHG"/} (last 150 lines)"
            tail -n 150 "$f"
        done
        echo "==================="
    } >&2
fi
log "result: $( ((RC == 0)) && echo PASS || echo "FAIL ($RC)"); ${SUMMARY[*]}"
exit "$RC"
