#!/usr/bin/env bash
# Builds the RPM target/packages/reservd-<version>-1.<arch>.rpm from this
# tree, in place, with the same `make install` as the Debian package and the
# same compiled binaries (cargo runs only if target/release is out of date).
#
# On Debian the rpm database knows none of the BuildRequires, so rpmbuild
# runs with --nodeps; the toolchain is the cargo on PATH. Debian's
# brp-compress uses bash's `read -d` but is run by /bin/sh (dash) and would
# leave the man page uncompressed, so it is run by bash here.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh build
if ! command -v rpmbuild >/dev/null; then
    echo "installing: rpm" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends rpm >/dev/null
fi

spec=packaging/rpm/reservd.spec
cargo_version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
rpm_version=$(sed -n 's/^Version: *//p' "$spec")
if [ "$cargo_version" != "$rpm_version" ]; then
    echo "build-rpm: Cargo.toml says $cargo_version, $spec says $rpm_version" >&2
    exit 1
fi

target=${CARGO_TARGET_DIR:-target}
mkdir -p "$target/packages" "$target/rpmbuild"
out=$(cd "$target/packages" && pwd)
top=$(cd "$target/rpmbuild" && pwd)
rm -f "$out/reservd-${rpm_version}-"*.rpm

rpmbuild -bb --build-in-place --nodeps \
    --define "_topdir $top" \
    --define "_rpmdir $out" \
    --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
    --define "__brp_compress bash %{_rpmconfigdir}/brp-compress %{?_prefix}" \
    "$spec"
rm -rf "$top"
ls "$out/reservd-${rpm_version}-"*.rpm
