#!/usr/bin/env bash
# Builds the Debian package target/packages/reservd_<version>_<arch>.deb from
# this tree, with the cargo on PATH, and checks it with lintian.
#
#   packaging/build-deb.sh            build, then lintian (fails on errors)
#   RESERVD_LINTIAN=0 packaging/build-deb.sh   build only
#
# packaging/debian/ is copied into a staging directory under target/ (so the
# source tree gets no debian/ directory), and debian/rules runs `make install`
# on this tree. dpkg-buildpackage runs with -d: the Rust toolchain usually
# comes from rustup, not from Debian's cargo and rustc packages (Debian 12's
# rustc is older than reservd's minimum, 1.85).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

scripts/deps.sh build
missing=()
for p in debhelper dpkg-dev lintian; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

cargo_version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
deb_version=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)
if [ "$cargo_version" != "$deb_version" ]; then
    echo "build-deb: Cargo.toml says $cargo_version, packaging/debian/changelog says $deb_version" >&2
    exit 1
fi
arch=$(dpkg-architecture -qDEB_HOST_ARCH)

out=${CARGO_TARGET_DIR:-target}/packages
mkdir -p "$out"
out=$(cd "$out" && pwd)
stage=$out/deb-src
rm -rf "$stage"
mkdir -p "$stage"
cp -a packaging/debian "$stage/debian"
rm -f "$out/reservd_${deb_version}_"*

(cd "$stage" && SRCDIR=$root dpkg-buildpackage -b -d --no-sign)
rm -rf "$stage"

deb=$out/reservd_${deb_version}_${arch}.deb
test -f "$deb"
if [ "${RESERVD_LINTIAN:-1}" != 0 ]; then
    lintian --fail-on error --info "$deb"
fi
echo "$deb"
