#!/usr/bin/env bash
# Builds an OCI image of reservd for KubeVirt's pr-helper container, offline
# from registries: a minimal Debian root (debootstrap --variant=minbase, from
# a Debian mirror) with multipath-tools' libraries, plus reservd's .deb,
# imported with podman and saved as an OCI archive.
#
#   packaging/build-image.sh [--suite SUITE] [--deb FILE] [--add-deb FILE]...
#                            [--multipath-conf FILE] [--output FILE] [--tag NAME]
#                            [--refresh]
#
#   --suite SUITE   Debian release of the root, so of libmpathpersist: pick the
#                   one whose multipath-tools matches the hosts' multipathd
#                   (bookworm 0.9.4, trixie 0.11.x, sid the newest). Default:
#                   this machine's release.
#   --deb FILE      reservd's .deb (default: target/packages/reservd_<version>_<arch>.deb,
#                   built with packaging/build-deb.sh when missing)
#   --add-deb FILE  also install this .deb (repeat it): e.g. the multipath-tools
#                   (and, where Debian splits them off, libmpathpersist0,
#                   libmultipath0, libmpathcmd0, kpartx) of the hosts' exact version
#   --output FILE   the OCI archive (default:
#                   target/packages/reservd-pr-helper_<version>_<suite>_<arch>.oci.tar)
#   --tag NAME      the image's name (default: localhost/reservd-pr-helper:<version>-<suite>)
#   --multipath-conf FILE
#                   the image's /etc/multipath.conf, libmpathpersist's configuration
#                   (default: reservation_key file; TEST UNIT READY as the path
#                   checker of the arrays multipath-tools checks with directio)
#   --refresh       build the Debian root again even if the cached one is recent
#
# The image runs as KubeVirt runs its pr-helper: /entrypoint.sh links the
# multipathd socket that virt-handler bind-mounts beside reservd's socket to
# /run/multipathd.socket and execs /usr/bin/qemu-pr-helper (reservd) with the
# container's arguments (default: -k /var/run/kubevirt/daemons/pr/pr-helper.sock).
# See docs/packaging.md, "KubeVirt".
#
# Cache (RESERVD_IMAGE_CACHE, default /var/cache/reservd-image): the Debian
# roots (roots/SUITE-KEY-EPOCH/, rebuilt after 7 days: sid moves, stable gets
# point releases) and the finished archives (images/KEY.oci.tar, KEY = the
# root, the .debs and this script). A second run with the same inputs only
# copies the archive. The mirror: RESERVD_IMAGE_MIRROR, else
# RESERVD_VM_MIRROR, else this machine's Debian mirror, else deb.debian.org.
# Nothing is pulled from a container registry.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${RESERVD_IMAGE_CACHE:-/var/cache/reservd-image}
ROOT_MAX_AGE_DAYS=7
# What the root holds besides minbase: multipath-tools brings libmpathpersist,
# libmultipath (their own packages in sid) and the path checker plugins
# libmpathpersist loads (/lib/multipath/libcheck*.so).
ROOT_PACKAGES=(multipath-tools)
SOCKET=/var/run/kubevirt/daemons/pr/pr-helper.sock

log() { printf '[build-image] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
t_start=${EPOCHREALTIME/./}
elapsed() { local us=$(( ${EPOCHREALTIME/./} - t_start )); printf '%d.%d s' $((us / 1000000)) $(( (us % 1000000) / 100000 )); }

SUITE='' DEB='' OUTPUT='' TAG='' REFRESH=0 ADD_DEBS=() MULTIPATH_CONF=
while (($#)); do
    case $1 in
        --suite) SUITE=${2:?--suite needs a value}; shift 2 ;;
        --deb) DEB=${2:?--deb needs a file}; shift 2 ;;
        --add-deb) ADD_DEBS+=("${2:?--add-deb needs a file}"); shift 2 ;;
        --output) OUTPUT=${2:?--output needs a file}; shift 2 ;;
        --tag) TAG=${2:?--tag needs a name}; shift 2 ;;
        --multipath-conf) MULTIPATH_CONF=${2:?--multipath-conf needs a file}; shift 2 ;;
        --refresh) REFRESH=1; shift ;;
        -h|--help) sed -n '2,/^set -e/{/^set -e/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
((EUID == 0)) || die "run as root (debootstrap, chroot, podman's storage)"

if [[ -z $SUITE ]]; then
    # shellcheck source=/dev/null
    SUITE=$(. /etc/os-release 2>/dev/null && printf '%s' "${VERSION_CODENAME:-}")
    [[ -n $SUITE ]] || SUITE=bookworm
fi
[[ $SUITE =~ ^[a-z]+$ ]] || die "bad suite: $SUITE"

# ---- tools ------------------------------------------------------------------------
missing=()
for p in debootstrap podman; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
arch=$(dpkg --print-architecture)
out_dir=${CARGO_TARGET_DIR:-target}/packages
if [[ -z $DEB ]]; then
    DEB=$out_dir/reservd_${version}_${arch}.deb
    if [[ ! -f $DEB ]]; then
        log "no $DEB: building it"
        RESERVD_LINTIAN=0 packaging/build-deb.sh >&2
    fi
fi
[[ -f $DEB ]] || die "no such .deb: $DEB"
DEB=$(readlink -f "$DEB")
for f in "${ADD_DEBS[@]}"; do [[ -f $f ]] || die "no such .deb: $f"; done
if [[ -n $MULTIPATH_CONF ]]; then
    [[ -r $MULTIPATH_CONF ]] || die "cannot read $MULTIPATH_CONF"
    MULTIPATH_CONF=$(readlink -f "$MULTIPATH_CONF")
fi
[[ -n $OUTPUT ]] || OUTPUT=$out_dir/reservd-pr-helper_${version}_${SUITE}_${arch}.oci.tar
[[ -n $TAG ]] || TAG=localhost/reservd-pr-helper:${version}-${SUITE}
mkdir -p "$(dirname "$OUTPUT")"
OUTPUT=$(readlink -f "$OUTPUT")

# ---- the Debian root (cached) -----------------------------------------------------
debian_mirror() {
    local uri='' line f=/etc/apt/sources.list.d/debian.sources
    for uri in "${RESERVD_IMAGE_MIRROR:-}" "${RESERVD_VM_MIRROR:-}"; do
        [[ -n $uri ]] && { printf '%s' "$uri"; return; }
    done
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

build_root() {   # $1 = output dir (root/ inside it)
    local out=$1 mirror pkgs
    mirror=$(debian_mirror)
    pkgs=$(IFS=,; printf '%s' "${ROOT_PACKAGES[*]}")
    log "building the $SUITE root: debootstrap --variant=minbase --include=$pkgs $SUITE from $mirror"
    # (without apt: the image is rebuilt, never upgraded in place)
    if ! debootstrap --variant=minbase --arch="$arch" --include="$pkgs" --exclude=apt \
            "$SUITE" "$out/root" "$mirror" \
            >"$out/debootstrap.log" 2>&1; then
        tail -n 30 "$out/debootstrap.log" >&2
        [[ -r $out/root/debootstrap/debootstrap.log ]] && tail -n 30 "$out/root/debootstrap/debootstrap.log" >&2
        return 1
    fi
    # what a container never reads: package files, lists, docs, translations,
    # logs, udev's hardware database (no udevd runs in it), iconv's modules
    rm -rf "$out/root/usr/lib/udev/hwdb.bin" "$out/root/usr/lib/udev/hwdb.d" \
        "$out/root/usr/lib/$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)/gconv" \
        "$out/root/var/cache/apt/"*.bin "$out/root/var/cache/apt/archives/"*.deb \
        "$out/root/var/lib/apt/lists/"* "$out/root/usr/share/doc" "$out/root/usr/share/man" \
        "$out/root/usr/share/info" "$out/root/usr/share/locale" "$out/root/usr/share/lintian" \
        "$out/root/var/log/"* "$out/root/debootstrap"
    dpkg-query --admindir="$out/root/var/lib/dpkg" -W -f='${Version}' multipath-tools >"$out/mpath-version"
    touch "$out/.complete"
}

mkdir -p "$CACHE/roots" "$CACHE/images" "$CACHE/tmp"
exec {lockfd}>"$CACHE/.lock"
flock -w 1800 "$lockfd" || die "could not lock $CACHE/.lock"
rm -rf "$CACHE/tmp/"*   # what a killed build left (builds hold the lock)

key=$({ printf '%s\n' "$SUITE" "$arch" "${ROOT_PACKAGES[@]}"; declare -f build_root; } | sha256sum | cut -c1-12)
root_dir='' age=0
for d in "$CACHE/roots/$SUITE-$key-"*; do
    [[ -e $d/.complete ]] || continue
    [[ -z $root_dir || ${d##*-} -gt ${root_dir##*-} ]] && root_dir=$d
done
[[ -n $root_dir ]] && age=$(( ($(date +%s) - ${root_dir##*-}) / 86400 ))
if [[ -z $root_dir ]] || ((REFRESH || age >= ROOT_MAX_AGE_DAYS)); then
    t0=$(date +%s)
    tmp=$(mktemp -d "$CACHE/tmp/root-$SUITE.XXXXXX")
    if build_root "$tmp"; then
        mv "$tmp" "$CACHE/roots/$SUITE-$key-$t0"
        old=$root_dir
        root_dir=$CACHE/roots/$SUITE-$key-$t0
        [[ -n $old ]] && rm -rf "$old"
        log "root built in $(( $(date +%s) - t0 )) s"
    else
        rm -rf "$tmp"
        [[ -n $root_dir ]] || die "could not build the $SUITE root (see above)"
        log "warning: could not rebuild the $SUITE root, using the one from $(date -d "@${root_dir##*-}" +%F)"
    fi
else
    log "root: cached $root_dir"
fi
# drop other builds of this suite (another key: an older recipe)
for d in "$CACHE/roots/$SUITE-"*; do
    [[ -d $d && $d != "$root_dir" ]] && rm -rf "$d"
done
mpath_version=$(<"$root_dir/mpath-version")

# ---- the image ------------------------------------------------------------------------
# /entrypoint.sh: what KubeVirt's virt-handler DaemonSet runs in the pr-helper
# container (Command), with reservd's arguments (Args).
entrypoint() {
    cat <<'EOF'
#!/bin/sh
# reservd as KubeVirt's pr-helper. virt-handler bind-mounts the host's
# /run/multipathd.socket (multipath-tools 0.12 and later) into the socket
# directory it shares with this container; libmpathpersist looks for it at
# /run/multipathd.socket, then at multipathd's abstract socket (reachable
# only in the host's network namespace). Arguments: qemu-pr-helper's.
dir=/var/run/kubevirt/daemons/pr
mkdir -p /run
if [ ! -e /run/multipathd.socket ] || [ -L /run/multipathd.socket ]; then
    ln -sfn "$dir/multipathd.socket" /run/multipathd.socket
fi
exec /usr/bin/qemu-pr-helper "$@"
EOF
}
# libmpathpersist reads the container's /etc/multipath.conf; the keys and
# bindings are the host's (/etc/multipath is a host mount).
multipath_conf() {
    if [[ -n $MULTIPATH_CONF ]]; then cat "$MULTIPATH_CONF"; return; fi
    cat <<'EOF'
# reservd-pr-helper: libmpathpersist's configuration in this container.
# reservation_key file: guests choose their keys, multipathd keeps them in
# /etc/multipath/prkeys (the host's, mounted here). Copy the host's device
# settings that matter for reservations (all_tg_pt, path_checker,
# reservation_key per map) here, or build with --multipath-conf FILE.
defaults {
	user_friendly_names yes
	find_multipaths yes
	reservation_key file
}
EOF
}

assemble() {   # $1 = work dir
    local w=$1 f
    cp -a "$root_dir/root" "$w/root"
    mkdir -p "$w/root/tmp/debs"
    cp "$DEB" "${ADD_DEBS[@]}" "$w/root/tmp/debs/"
    # as a Dockerfile's RUN would: dpkg in the root (the postinst only
    # records the systemd units; nothing starts without systemd)
    chroot "$w/root" sh -c 'dpkg -i /tmp/debs/*.deb' >"$w/dpkg.log" 2>&1 ||
        { cat "$w/dpkg.log" >&2; return 1; }
    rm -rf "$w/root/tmp/debs" "$w/root/usr/share/doc" "$w/root/usr/share/man" "$w/root/var/log/"*
    ln -sfn reservd "$w/root/usr/bin/qemu-pr-helper"
    entrypoint >"$w/root/entrypoint.sh"
    chmod 0755 "$w/root/entrypoint.sh"
    multipath_conf >"$w/root/etc/multipath.conf"
    chmod 0644 "$w/root/etc/multipath.conf"
    mkdir -p "$w/root/etc/multipath"
    # the build machine's name and resolver: the runtime provides its own
    : >"$w/root/etc/hostname"
    rm -f "$w/root/etc/resolv.conf"
    (cd "$w/root" && tar --numeric-owner --xattrs --sort=name -cf "$w/rootfs.tar" .)
}

image_key=$({
    printf '%s\n' "$root_dir" "$TAG" "$SOCKET"
    sha256sum "$DEB" "${ADD_DEBS[@]}" | cut -c1-64
    declare -f entrypoint multipath_conf assemble
    multipath_conf
    sha256sum <"$0"
} | sha256sum | cut -c1-16)
cached=$CACHE/images/$image_key.oci.tar

if [[ -s $cached ]]; then
    log "image: cached ($cached)"
else
    work=$(mktemp -d "$CACHE/tmp/image.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    log "assembling the image from $(basename "$root_dir") and $(basename "$DEB") ${ADD_DEBS[*]:+${ADD_DEBS[*]##*/}}"
    assemble "$work" || die "assembling the root failed"
    installed=$(dpkg-query --admindir="$work/root/var/lib/dpkg" -W -f='${Version}' multipath-tools)
    [[ $installed == "$mpath_version" ]] || log "multipath-tools in the image: $installed (the root had $mpath_version)"
    mpath_version=$installed
    # podman with its own storage under the work dir: nothing is pulled,
    # nothing stays in the system's storage
    pm=(podman --root "$work/storage" --runroot "$work/run" --storage-driver vfs
        --cgroup-manager cgroupfs --events-backend file)
    "${pm[@]}" import \
        --change 'ENTRYPOINT ["/entrypoint.sh"]' \
        --change "CMD [\"-k\", \"$SOCKET\"]" \
        --change 'USER root' \
        --change 'WORKDIR /' \
        --change "LABEL org.opencontainers.image.title=reservd-pr-helper" \
        --change "LABEL org.opencontainers.image.version=$version" \
        --change "LABEL org.opencontainers.image.description=reservd as KubeVirt's pr-helper: SCSI persistent reservations for VMs, dm-multipath through libmpathpersist" \
        --change "LABEL io.reservd.debian-suite=$SUITE" \
        --change "LABEL io.reservd.multipath-tools=$mpath_version" \
        --message "reservd $version on Debian $SUITE, multipath-tools $mpath_version" \
        "$work/rootfs.tar" "$TAG" >"$work/podman.log" 2>&1 ||
        { cat "$work/podman.log" >&2; die "podman import failed"; }
    "${pm[@]}" save --format oci-archive -o "$work/image.oci.tar" "$TAG" >"$work/podman.log" 2>&1 ||
        { cat "$work/podman.log" >&2; die "podman save failed"; }
    mv "$work/image.oci.tar" "$cached"
    rootfs_bytes=$(stat -c %s "$work/rootfs.tar")
    printf '%s\n' "$rootfs_bytes" >"$cached.rootfs-size"
    printf '%s\n' "$mpath_version" >"$cached.mpath-version"
    rm -rf "$work"
    trap - EXIT
fi
# finished archives: the 8 used last, none older than a week
touch "$cached"
# shellcheck disable=SC2012  # (names are hex digests)
{ find "$CACHE/images" -name '*.oci.tar' -mtime +7; ls -t "$CACHE/images/"*.oci.tar | tail -n +9; } 2>/dev/null |
    sort -u | while read -r f; do [[ $f == "$cached" ]] || rm -f "$f" "$f".*; done
flock -u "$lockfd"

rm -f "$OUTPUT"
ln "$cached" "$OUTPUT" 2>/dev/null || cp "$cached" "$OUTPUT"
mpath_version=$(<"$cached.mpath-version")
printf '%s\n' "$TAG" >"$OUTPUT.tag"
mb() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
log "image $TAG: Debian $SUITE, multipath-tools $mpath_version, reservd $version"
log "size: $(mb "$(stat -c %s "$OUTPUT")") MiB archive (uncompressed: one layer, $(mb "$(<"$cached.rootfs-size")") MiB root), built in $(elapsed)"
log "load it with: podman load -i $OUTPUT"
echo "$OUTPUT"
