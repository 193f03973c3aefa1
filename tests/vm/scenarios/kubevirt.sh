#!/bin/bash
# reservd's pr-helper image (packaging/build-image.sh) run the way KubeVirt's
# virt-handler DaemonSet runs its pr-helper container, on a node with a real
# dm-multipath map:
#
# * podman loads the OCI archive (no registry) and runs it privileged, as
#   root, with KubeVirt's command (/entrypoint.sh -k
#   /var/run/kubevirt/daemons/pr/pr-helper.sock) and mounts: the socket
#   directory (bidirectional), the host's /dev (host to container) and
#   /etc/multipath (bidirectional);
# * multipathd is reached the way the node offers it: with multipath-tools
#   0.12 and later through /run/multipathd.socket, bind-mounted into the
#   socket directory as virt-handler does, from a private network namespace
#   (KubeVirt's pod), where the abstract socket is out of reach; before
#   0.12 only the abstract socket exists, so the container shares the
#   host's network namespace;
# * QEMU's side runs as KubeVirt's uid 107 outside the container: the socket
#   is root's 0600 until virt-handler hands it to 107:107, then REGISTER,
#   RESERVE, RELEASE and unregister go through the map, and sg_persist reads
#   the key on both paths, multipathd stores it;
# * a reservd killed with SIGKILL leaves its socket behind; the next start
#   on that path serves (in the container, restarted as the kubelet would,
#   and a bare reservd), and the new socket shows up as a file created in
#   the directory, the event virt-handler's watcher re-owns it on;
# * reservd can give the socket to QEMU's group itself
#   (--socket-group 107 --socket-mode 0660), without virt-handler.
#
# Needs the image for the guest's release
# (target/packages/reservd-pr-helper_<version>_<release>_amd64.oci.tar, or
# RESERVD_KUBEVIRT_IMAGE) and target/release/reservdctl and reservd
# (packaging/build-deb.sh builds them). Run it with
#   tests/vm/run-vm.sh [--release sid] tests/vm/scenarios/kubevirt.sh
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
RELEASE=${RESERVD_VM_RELEASE:-bookworm}
MP=$RESERVD_MP_DEV
P1=${MP_PATHS[0]} P2=${MP_PATHS[1]}
DIR=/var/run/kubevirt/daemons/pr       # reservation.GetPrHelperSocketDir()
SOCK=$DIR/pr-helper.sock                # reservation.GetPrHelperSocketPath()
QEMU_UID=107                            # util.NonRootUID: virt-launcher's QEMU
CTL=$ROOT/target/release/reservdctl
RESERVD=$ROOT/target/release/reservd
KT=/run/reservd-kubevirt                # podman's storage (tmpfs) and scratch
PM=(podman --root "$KT/storage" --runroot "$KT/run" --cgroup-manager cgroupfs
    --events-backend file)
NAME=pr-helper
BARE_PID=
DM_OWNER=$(stat -c %u:%g "${RESERVD_MP_DM:?}")

LOGS=${RESERVD_VM_LOGDIR:-/tmp}
cleanup() {
    "${PM[@]}" logs "$NAME" >"$LOGS/kubevirt-pr-helper.log" 2>&1 || true
    "${PM[@]}" rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
    if [[ -n $BARE_PID ]]; then kill -9 "$BARE_PID" 2>/dev/null || true; fi
    umount "$DIR/multipathd.socket" 2>/dev/null || true
    chown "$DM_OWNER" "$RESERVD_MP_DM" 2>/dev/null || true
}
trap cleanup EXIT

IMAGE=${RESERVD_KUBEVIRT_IMAGE:-}
if [[ -z $IMAGE ]]; then
    for f in "$ROOT"/target/packages/reservd-pr-helper_*_"${RELEASE}"_amd64.oci.tar; do IMAGE=$f; done
fi
[[ -f $IMAGE ]] || fail "no image for $RELEASE: run packaging/build-image.sh --suite $RELEASE"
[[ -x $CTL && -x $RESERVD ]] || fail "no $CTL or $RESERVD: run packaging/build-deb.sh"
type -P podman >/dev/null || fail "podman is not installed in the $RELEASE root"
# as QEMU: uid 107, no groups
as_qemu() { setpriv --reuid="$QEMU_UID" --regid="$QEMU_UID" --clear-groups -- "$@"; }
# wait_socket PATH: until reservd serves on PATH (a command on the
# single-path disk: SG_IO, whatever the map's state)
wait_socket() {
    local i
    for ((i = 0; i < 150; i++)); do
        [[ -S $1 ]] && "$CTL" -k "$1" in "${RESERVD_SP_DEV:?}" read-keys >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    fail "no reservd serving on $1"
}
sock_id() { stat -c '%i %U:%G %a' "$1"; }

step "1. the node: podman, cgroups, shared mounts, KubeVirt's socket directory"
echo "release $RELEASE, multipathd $RESERVD_MPATH_VERSION, image $IMAGE ($(du -m "$IMAGE" | cut -f1) MiB)"
# what systemd sets up on a node and PID 1 here does not: the cgroup
# hierarchy and shared mount propagation (kubelet's bidirectional mounts)
[[ $(stat -fc %T /sys/fs/cgroup 2>/dev/null) == cgroup2fs ]] || mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount --make-rshared /
mkdir -p "$KT" "$DIR"
mount -t tmpfs -o mode=0755 tmpfs "$KT"
chown "$QEMU_UID:$QEMU_UID" "$DIR"     # virt-handler: setSocketDirectoryPermissions
T0=${EPOCHREALTIME/./}
ok "${PM[@]}" load -i "$IMAGE"
echo "  podman load: $(( (${EPOCHREALTIME/./} - T0) / 1000 )) ms"
TAG=$(grep -o 'localhost/[^ ,]*' <<<"$OUT" | head -n1)
[[ -n $TAG ]] || fail "podman load named no image"
ok "${PM[@]}" image inspect --format '{{.Config.Entrypoint}} {{.Config.Cmd}} {{index .Config.Labels "io.reservd.multipath-tools"}}' "$TAG"
has "[/entrypoint.sh] [-k $SOCK]"
IMAGE_MPATH=${OUT##* }
echo "  the image's multipath-tools: $IMAGE_MPATH, the node's multipathd: $RESERVD_MPATH_VERSION"
[[ ${IMAGE_MPATH%%-*} == "$RESERVD_MPATH_VERSION" ]] ||
    fail "the image's libmpathpersist ($IMAGE_MPATH) is not the node's release ($RESERVD_MPATH_VERSION)"

# multipathd's sockets: the pathname socket from 0.12 on
if [[ -S /run/multipathd.socket ]]; then
    # virt-handler's multipath monitor: an empty file, the socket bind-mounted on it
    : >"$DIR/multipathd.socket"
    mount --bind /run/multipathd.socket "$DIR/multipathd.socket"
    NET=none
    echo "  multipathd listens on /run/multipathd.socket: bind-mounted to $DIR, private network namespace"
else
    [[ $(printf '%s\n' "$RESERVD_MPATH_VERSION" 0.12 | sort -V | head -n1) != 0.12 ]] ||
        fail "multipath-tools $RESERVD_MPATH_VERSION should listen on /run/multipathd.socket"
    NET=host
    echo "  multipathd $RESERVD_MPATH_VERSION has only its abstract socket: the host's network namespace"
fi

RUN=(run -d --name "$NAME" --pull=never --privileged --user 0 --network "$NET"
     --log-driver k8s-file
     -v "$DIR:$DIR:rshared" -v /dev:/dev:rslave -v /etc/multipath:/etc/multipath:rshared
     --entrypoint /entrypoint.sh "$TAG" -k "$SOCK")

step "2. the container starts with KubeVirt's command and mounts, and serves"
T0=${EPOCHREALTIME/./}
ok "${PM[@]}" "${RUN[@]}"
wait_socket "$SOCK"
echo "  podman run -> serving: $(( (${EPOCHREALTIME/./} - T0) / 1000 )) ms"
ok "${PM[@]}" exec "$NAME" sh -c "tr '\\0' ' ' </proc/1/cmdline"
[[ $OUT == "/usr/bin/qemu-pr-helper -k $SOCK"* ]] || fail "PID 1 of the container: $OUT"
# the container's own check: library, multipathd, reservation_key, privileges, socket
ok "${PM[@]}" exec "$NAME" reservdctl -k "$SOCK" check
has "multipath-tools ${IMAGE_MPATH%%-*}"
has "multipathd reachable"
has "reservation_key file configured"
has "All good."
if [[ $NET == none ]]; then
    # the abstract socket is the host network namespace's: out of reach here
    expect_rc 5 "${PM[@]}" exec -e MULTIPATH_SOCKET_NAME=@/org/kernel/linux/storage/multipathd \
        "$NAME" reservdctl -k "$SOCK" check
    has "multipathd not reachable"
fi

step "3. QEMU's uid: refused on reservd's 0600 socket, served once virt-handler re-owns it"
ok stat -c '%U:%G %a %F' "$SOCK"
has "root:root 600 socket"
chown "$QEMU_UID:$QEMU_UID" "$RESERVD_MP_DM"       # the LUN, as virt-launcher gets it
expect_rc 1 as_qemu "$CTL" -k "$SOCK" in "$MP" read-keys
has "permission denied"
chown "$QEMU_UID:$QEMU_UID" "$SOCK"               # virt-handler: setSocketPermissions
ok as_qemu "$CTL" -k "$SOCK" in "$MP" read-keys
has "no registered reservation keys"

step "4. REGISTER through the map: the key on both paths, multipathd stores it"
expect_no_keys "$P1"
ok as_qemu "$CTL" -k "$SOCK" out "$MP" register --sa-key 0x7e57c0de
for p in "$P1" "$P2"; do expect_keys "$p" 0x7e57c0de 2; done
ok sg_persist --in --read-full-status "$P1"
for i in "${MP_INITIATORS[@]}"; do has "SAS address: 0x${i#naa.}"; done
ok multipathd getprkey map "$RESERVD_MP_ALIAS"
has "0x7e57c0de"
ok grep -i 7e57c0de /etc/multipath/prkeys
ok "$CTL" status "$MP"
has "consistent"
ok as_qemu "$CTL" -k "$SOCK" in "$MP" read-keys
has "0x7e57c0de"

step "5. RESERVE (type 5) and RELEASE through the map"
ok as_qemu "$CTL" -k "$SOCK" out "$MP" reserve --key 0x7e57c0de --type 5
for p in "$P1" "$P2"; do
    ok sg_persist --in --read-reservation "$p"
    has "Key=0x7e57c0de"
    has "Write Exclusive, registrants only"
done
# node 2, unregistered, cannot write
expect_rc 24 sg_raw -s 512 -i /dev/zero "$RESERVD_N2_MP_SG" 2a 00 00 00 00 00 00 00 01 00
ok as_qemu "$CTL" -k "$SOCK" out "$MP" release --key 0x7e57c0de --type 5
# The release gives every other registrant a unit attention (RESERVATIONS
# RELEASED), the map's other path included: read past it, as an initiator does.
for p in "$P1" "$P2"; do
    run sg_persist --in --read-reservation "$p"
    ((RC == 6)) && has "Reservations released" && run sg_persist --in --read-reservation "$p"
    ((RC == 0)) || fail "'sg_persist --in --read-reservation $p' exited with $RC"
    has "no reservation held"
done
for p in "$P1" "$P2"; do expect_keys "$p" 0x7e57c0de 2; done
ok "${PM[@]}" logs "$NAME"
has "PR OUT RESERVE"
has "backend=multipath"
has "peer_uid=$QEMU_UID"

step "6. kill -9 of the containerized reservd: its socket stays, the restarted container serves"
PID1=$("${PM[@]}" inspect --format '{{.State.Pid}}' "$NAME")
BEFORE=$(sock_id "$SOCK")
echo "  reservd is pid $PID1 on the node; socket: $BEFORE"
kill -9 "$PID1"
for ((i = 0; i < 50; i++)); do
    [[ $("${PM[@]}" inspect --format '{{.State.Status}}' "$NAME") == exited ]] && break
    sleep 0.2
done
ok "${PM[@]}" inspect --format '{{.State.Status}} {{.State.ExitCode}}' "$NAME"
has "exited 137"
[[ -S $SOCK ]] || fail "the killed reservd's socket is gone; this step needs it stale"
expect_rc 1 "$CTL" -k "$SOCK" in "$MP" read-keys
echo "  $SOCK: stale ($(sock_id "$SOCK")), connecting fails"
# virt-handler's device plugin re-owns the socket on a create event in the
# directory (fsnotify Create: IN_CREATE or IN_MOVED_TO): watch for it
python3 - "$DIR" pr-helper.sock 30 >"$KT/inotify" 2>&1 <<'PY' &
import ctypes, os, select, struct, sys, time
IN_CREATE, IN_MOVED_TO = 0x100, 0x80
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(os.O_NONBLOCK)
if fd < 0 or libc.inotify_add_watch(fd, sys.argv[1].encode(), IN_CREATE | IN_MOVED_TO) < 0:
    sys.exit("inotify: errno %d" % ctypes.get_errno())
print("watching", flush=True)
deadline = time.time() + float(sys.argv[3])
while time.time() < deadline:
    if not select.select([fd], [], [], 0.5)[0]:
        continue
    buf = os.read(fd, 65536)
    i = 0
    while i < len(buf):
        _, mask, _, n = struct.unpack_from("iIII", buf, i)
        name = buf[i + 16:i + 16 + n].rstrip(b"\0").decode()
        i += 16 + n
        if name == sys.argv[2]:
            print("IN_CREATE" if mask & IN_CREATE else "IN_MOVED_TO", name, flush=True)
            sys.exit(0)
sys.exit("no create event for " + sys.argv[2])
PY
WATCH=$!
for ((i = 0; i < 50; i++)); do grep -q watching "$KT/inotify" && break; sleep 0.1; done
T0=${EPOCHREALTIME/./}
ok "${PM[@]}" start "$NAME"
wait_socket "$SOCK"
echo "  restart -> serving: $(( (${EPOCHREALTIME/./} - T0) / 1000 )) ms"
AFTER=$(sock_id "$SOCK")
echo "  socket now: $AFTER"
[[ ${AFTER%% *} != "${BEFORE%% *}" ]] || fail "the socket is the stale one"
[[ ${AFTER#* } == "root:root 600" ]] || fail "the new socket is $AFTER, expected root:root 600"
wait "$WATCH" || { cat "$KT/inotify"; fail "no create event for the new socket"; }
echo "  directory watch: $(tail -n1 "$KT/inotify")"
expect_rc 1 as_qemu "$CTL" -k "$SOCK" in "$MP" read-keys
chown "$QEMU_UID:$QEMU_UID" "$SOCK"               # virt-handler, on that event
ok as_qemu "$CTL" -k "$SOCK" in "$MP" read-keys
has "0x7e57c0de"
leftovers=$(find "$DIR" -mindepth 1 -maxdepth 1 ! -name pr-helper.sock ! -name multipathd.socket)
[[ -z $leftovers ]] || fail "left in $DIR: $leftovers"

step "7. unregister through the restarted container: no key on either path, none in multipathd"
ok as_qemu "$CTL" -k "$SOCK" out "$MP" register --key 0x7e57c0de --sa-key 0
for p in "$P1" "$P2"; do expect_no_keys "$p"; done
ok multipathd getprkey map "$RESERVD_MP_ALIAS"
has "none"
ok "${PM[@]}" rm -f -t 0 "$NAME"

step "8. kill -9 of a bare reservd owning its socket (re-owned to uid 107), then a new one on the path"
BARE=$KT/bare/pr-helper.sock
mkdir -p "${BARE%/*}"
chown "$QEMU_UID:$QEMU_UID" "${BARE%/*}"
"$RESERVD" -k "$BARE" 2>"$KT/bare.log" &
BARE_PID=$!
wait_socket "$BARE"
chown "$QEMU_UID:$QEMU_UID" "$BARE"
BEFORE=$(sock_id "$BARE")
kill -9 "$BARE_PID"
wait "$BARE_PID" 2>/dev/null || true
BARE_PID=
[[ -S $BARE ]] || fail "the killed reservd's socket is gone"
expect_rc 1 "$CTL" -k "$BARE" in "$MP" read-keys
echo "  stale: $BEFORE"
"$RESERVD" -k "$BARE" 2>>"$KT/bare.log" &
BARE_PID=$!
wait_socket "$BARE"
AFTER=$(sock_id "$BARE")
echo "  new:   $AFTER"
[[ ${AFTER%% *} != "${BEFORE%% *}" && ${AFTER#* } == "root:root 600" ]] || fail "socket after the restart: $AFTER"
ok "$CTL" -k "$BARE" in "$MP" read-keys
has "no registered reservation keys"
leftovers=$(find "${BARE%/*}" -mindepth 1 ! -name pr-helper.sock)
[[ -z $leftovers ]] || fail "left behind: $leftovers"
# SIGTERM: reservd unlinks its socket if its dropped privileges let it
# (in a directory owned by uid 107 they do not); either way the next start serves
kill "$BARE_PID"
wait "$BARE_PID" 2>/dev/null || true
BARE_PID=
if [[ -e $BARE ]]; then echo "  after SIGTERM: the socket stays ($(sock_id "$BARE"))"; else echo "  after SIGTERM: the socket is gone"; fi

step "9. the socket made for QEMU's group by reservd itself (--socket-group 107 --socket-mode 0660)"
"$RESERVD" -k "$BARE" --socket-group "$QEMU_UID" --socket-mode 0660 2>>"$KT/bare.log" &
BARE_PID=$!
wait_socket "$BARE"
ok stat -c '%U:%g %a' "$BARE"
has "root:$QEMU_UID 660"
ok as_qemu "$CTL" -k "$BARE" in "$MP" read-keys
has "no registered reservation keys"
kill "$BARE_PID"
wait "$BARE_PID" 2>/dev/null || true
BARE_PID=
sed 's/^/  reservd| /' "$KT/bare.log"

echo
echo "kubevirt: all checks passed ($RELEASE, multipath-tools $RESERVD_MPATH_VERSION, network $NET)"
