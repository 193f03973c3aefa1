#!/usr/bin/python3
"""faultpath: one more path to a LU of the reservd test VM, whose commands a
test can hold back for a chosen time before they reach the LU.

    faultpath.py add MAP NAME [--wait SECS]   new path NAME to the map's LU
    faultpath.py set NAME [delay=MS] [ops=LIST]
    faultpath.py show NAME                    the path's variables and control

How it is built (LIO in the guest, nothing outside the kernel's own modules):

    /dev/sdX (the new path; multipathd adds it to MAP: same WWID)
      | tcm_loop target "outer", its own SCSI host
    TCMU device (target_core_user), PR and ALUA passed through, not emulated
      | this program, the device's user-space handler: every command goes on,
      | unchanged, with SG_IO on ...
    /dev/sgN (the "inner" nexus: a tcm_loop target with its own initiator port
      | to the map's LU; no sd driver is bound to it, so no block device, no
      | udev probing and no multipath path)
    the map's own LIO backstore (fileio): its one persistent reservation state

So the LU sees the new path as one more I_T nexus (the inner initiator port,
which READ FULL STATUS lists), shares its registrations and reservation with
the map's other paths and node 2, and answers it as it answers any nexus
(unit attentions, reservation conflicts, VPD pages with the inner target
port). The fault sits in front of that otherwise ordinary path: a command
whose opcode the control file names waits there before it is passed on.

Control file ($FAULTPATH_CTL, re-read on every command and every 10 ms by a
waiting one; write it whole, e.g. with `faultpath.py set` or a rename):

    delay=MS   hold each matching command MS milliseconds, then pass it on and
               answer it with the LU's answer; 0 = no fault; -1 = hold until
               the control file says otherwise (at most 50 s: the device's
               command timeout is 60 s)
    ops=LIST   which commands: "pr" (PERSISTENT RESERVE IN/OUT, the default),
               "all", or opcodes in hex ("5e,5f,00")

A waiting command is measured from its arrival, so lowering the delay (or
setting 0) releases the commands that waited that long already. A command
the initiator aborts (its SCSI timeout expired: libmpathpersist waits 2 s)
while it waits is dropped, never passed on: the LU never executes it, as
with a command lost on a dead path. The handler appends a line per held
command to $FAULTPATH_LOG:

    <arrival, epoch s> id=<tag> op=<opcode>/<service action> held_ms=<ms> <passed status=0xNN|aborted>

and one per task management function the initiator sent (`tmr type=N ids=...`).
The file `held` next to the log says how many commands wait now.
"""

import ctypes
import glob
import mmap
import os
import struct
import sys
import threading
import time
import traceback

CFG = "/sys/kernel/config/target"
STATE = "/run/reservd-vm/faultpath"
AUTOPROBE = "/sys/bus/scsi/drivers_autoprobe"
# LIO's NAA designator: IEEE company id 0x001405 and the first 25 hex digits
# of vpd_unit_serial; udev and multipath prefix the NAA type "3".
NAA_PREFIX = "36001405"
# The TCMU device's command timeout (configfs attribute, seconds) and the
# longest hold, safely below it.
CMD_TIME_OUT_S = 60
MAX_HOLD_S = 50.0
# SG_IO timeout of a passed-on command (the LU answers in microseconds).
PASS_TIMEOUT_MS = 30000

# tcmu ring layout (include/uapi/linux/target_core_user.h, x86-64)
MB_CMD_HEAD = 12
MB_CMD_TAIL = 64
OP_PAD, OP_CMD, OP_TMR = 0, 1, 2
UFLAG_READ_LEN = 0x2
ENT_IOV_CNT = 8
ENT_CDB_OFF = 24
ENT_IOV = 48
RSP_STATUS = 8
RSP_READ_LEN = 12
RSP_SENSE = 16
SENSE_SIZE = 96
TMR_CNT = 12
TMR_IDS = 32

SG_IO = 0x2285
SG_DXFER_NONE, SG_DXFER_TO_DEV, SG_DXFER_FROM_DEV = -1, -2, -3
CHECK_CONDITION = 0x02

# Commands that carry data to the device; any other command with a buffer
# reads from it (TCMU does not say which way the data goes).
DATA_OUT = {
    0x04, 0x07, 0x0A, 0x15, 0x1D, 0x2A, 0x2E, 0x2F, 0x3B, 0x41, 0x42, 0x4C,
    0x55, 0x56, 0x57, 0x5F, 0x83, 0x89, 0x8A, 0x8E, 0x8F, 0x93, 0x9F, 0xA4,
    0xAA, 0xAE, 0xAF,
}


def die(msg):
    print(f"faultpath: {msg}", file=sys.stderr)
    sys.exit(1)


def read(path):
    with open(path) as f:
        return f.read().strip()


def put(path, value):
    try:
        with open(path, "w") as f:
            f.write(f"{value}\n")
    except OSError as e:
        die(f"cannot write '{value}' to {path}: {e}")


def wait_for(secs, what, check):
    deadline = time.monotonic() + secs
    while True:
        r = check()
        if r:
            return r
        if time.monotonic() > deadline:
            die(f"timed out after {secs}s waiting for {what}")
        time.sleep(0.02)


def cdb_len(cdb0, mm, off):
    group = cdb0 >> 5
    if cdb0 == 0x7F:
        return 8 + mm[off + 7]
    return {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}.get(group, 16)


def fixed_sense(key, asc, ascq):
    return bytes([0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0, 0, 0, 0])


# ------------------------------------------------------------------ control


class Control:
    """The control file, parsed again whenever it changes."""

    def __init__(self, path):
        self.path = path
        self.stamp = None
        self.spec = (0, {0x5E, 0x5F})  # (delay in ms, opcodes or None for all)

    def refresh(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return
        stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
        if stamp == self.stamp:
            return
        self.stamp = stamp
        delay, ops = 0, {0x5E, 0x5F}
        try:
            words = read(self.path).split()
        except OSError:
            return
        for w in words:
            k, _, v = w.partition("=")
            if k == "delay":
                delay = -1 if v in ("-1", "inf") else int(v)
            elif k == "ops":
                if v == "pr":
                    ops = {0x5E, 0x5F}
                elif v == "all":
                    ops = None
                else:
                    ops = {int(x, 16) for x in v.split(",") if x}
        self.spec = (delay, ops)

    def hold_ms(self, opcode):
        """How long a command with this opcode is held now (0: not at all)."""
        self.refresh()
        delay, ops = self.spec
        if delay == 0 or (ops is not None and opcode not in ops):
            return 0
        return delay


# ------------------------------------------------------------------ SG_IO


class SgIoHdr(ctypes.Structure):
    _fields_ = [
        ("interface_id", ctypes.c_int),
        ("dxfer_direction", ctypes.c_int),
        ("cmd_len", ctypes.c_ubyte),
        ("mx_sb_len", ctypes.c_ubyte),
        ("iovec_count", ctypes.c_ushort),
        ("dxfer_len", ctypes.c_uint),
        ("dxferp", ctypes.c_void_p),
        ("cmdp", ctypes.c_void_p),
        ("sbp", ctypes.c_void_p),
        ("timeout", ctypes.c_uint),
        ("flags", ctypes.c_uint),
        ("pack_id", ctypes.c_int),
        ("usr_ptr", ctypes.c_void_p),
        ("status", ctypes.c_ubyte),
        ("masked_status", ctypes.c_ubyte),
        ("msg_status", ctypes.c_ubyte),
        ("sb_len_wr", ctypes.c_ubyte),
        ("host_status", ctypes.c_ushort),
        ("driver_status", ctypes.c_ushort),
        ("resid", ctypes.c_int),
        ("duration", ctypes.c_uint),
        ("info", ctypes.c_uint),
    ]


LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


def sg_io(fd, cdb, direction, data, length):
    """Send one command; (status, sense, data read)."""
    hdr = SgIoHdr()
    hdr.interface_id = ord("S")
    cdb_buf = ctypes.create_string_buffer(cdb, len(cdb))
    sense = ctypes.create_string_buffer(SENSE_SIZE)
    buf = None
    if direction == SG_DXFER_TO_DEV:
        buf = ctypes.create_string_buffer(data, length)
    elif direction == SG_DXFER_FROM_DEV:
        buf = ctypes.create_string_buffer(length)
    hdr.dxfer_direction = direction
    hdr.cmd_len = len(cdb)
    hdr.mx_sb_len = SENSE_SIZE
    hdr.dxfer_len = length if buf is not None else 0
    hdr.dxferp = ctypes.addressof(buf) if buf is not None else None
    hdr.cmdp = ctypes.addressof(cdb_buf)
    hdr.sbp = ctypes.addressof(sense)
    hdr.timeout = PASS_TIMEOUT_MS
    if LIBC.ioctl(fd, SG_IO, ctypes.addressof(hdr)) < 0:
        err = ctypes.get_errno()
        return CHECK_CONDITION, fixed_sense(0x0B, 0x08, 0x00), b"", f"SG_IO errno {err}"
    if hdr.host_status or (hdr.driver_status & 0x0F and hdr.status == 0):
        note = f"host_status 0x{hdr.host_status:x} driver_status 0x{hdr.driver_status:x}"
        return CHECK_CONDITION, fixed_sense(0x0B, 0x08, 0x00), b"", note
    got = b""
    if direction == SG_DXFER_FROM_DEV:
        got = buf.raw[: max(0, length - hdr.resid)]
    return hdr.status, sense.raw[: hdr.sb_len_wr], got, None


# ------------------------------------------------------------------ the handler


class Handler:
    def __init__(self, uio, size, inner_sg, statedir):
        self.fd = os.open(uio, os.O_RDWR)
        self.mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        _version, _flags, self.cmdr_off, self.cmdr_size = struct.unpack_from("<HHII", self.mm, 0)
        self.sg = os.open(inner_sg, os.O_RDWR)
        self.ctl = Control(os.path.join(statedir, "ctl"))
        self.log = open(os.path.join(statedir, "log"), "a", buffering=1)
        self.held_file = os.path.join(statedir, "held")
        self.lock = threading.Lock()
        self.pos = struct.unpack_from("<I", self.mm, MB_CMD_TAIL)[0]
        self.tail = self.pos
        self.held = {}  # cmd_id -> threading.Event (set: aborted)

    def u32(self, off):
        return struct.unpack_from("<I", self.mm, off)[0]

    def run(self):
        while True:
            head = self.u32(MB_CMD_HEAD)
            while self.pos != head:
                e = self.cmdr_off + self.pos
                len_op = self.u32(e)
                op, length = len_op & 7, len_op & ~7
                if op == OP_CMD:
                    self.command(e)
                elif op == OP_TMR:
                    self.tmr(e)
                self.pos = (self.pos + length) % self.cmdr_size
            os.read(self.fd, 4)  # wait for the kernel's next notification

    def tmr(self, e):
        tmr_type = self.mm[e + 8]
        cnt = self.u32(e + TMR_CNT)
        ids = struct.unpack_from(f"<{cnt}H", self.mm, e + TMR_IDS) if cnt else ()
        self.log.write(f"{time.time():.3f} tmr type={tmr_type} ids={','.join(map(str, ids))}\n")
        with self.lock:
            for i in ids:
                ev = self.held.get(i)
                if ev is not None:
                    ev.set()

    def command(self, e):
        cmd_id = struct.unpack_from("<H", self.mm, e + 4)[0]
        iov_cnt, iov_bidi = struct.unpack_from("<II", self.mm, e + ENT_IOV_CNT)
        cdb_off = struct.unpack_from("<Q", self.mm, e + ENT_CDB_OFF)[0]
        cdb = bytes(self.mm[cdb_off : cdb_off + cdb_len(self.mm[cdb_off], self.mm, cdb_off)])
        iovs = [struct.unpack_from("<QQ", self.mm, e + ENT_IOV + 16 * i) for i in range(iov_cnt)]
        if iov_bidi:
            self.complete(cmd_id, CHECK_CONDITION, fixed_sense(0x05, 0x20, 0x00))
            return
        hold = self.ctl.hold_ms(cdb[0])
        if hold == 0:
            self.pass_on(cmd_id, cdb, iovs)
            return
        ev = threading.Event()
        with self.lock:
            self.held[cmd_id] = ev
            self.count_held()
        threading.Thread(target=self.hold, args=(cmd_id, cdb, iovs, ev), daemon=True).start()

    def hold(self, cmd_id, cdb, iovs, aborted):
        t0 = time.monotonic()
        arrival = time.time()
        while True:
            hold = self.ctl.hold_ms(cdb[0])
            waited = time.monotonic() - t0
            if hold == 0 or (hold > 0 and waited * 1000 >= hold) or waited >= MAX_HOLD_S:
                break
            if aborted.wait(0.01):
                break
        with self.lock:
            self.held.pop(cmd_id, None)
            self.count_held()
        waited_ms = (time.monotonic() - t0) * 1000
        sa = cdb[1] & 0x1F if len(cdb) > 1 else 0
        what = f"{arrival:.3f} id={cmd_id} op={cdb[0]:02x}/{sa:02x} held_ms={waited_ms:.0f}"
        if aborted.is_set():
            self.log.write(f"{what} aborted\n")
            self.complete(cmd_id, CHECK_CONDITION, fixed_sense(0x0B, 0x00, 0x00))
            return
        status = self.pass_on(cmd_id, cdb, iovs)
        self.log.write(f"{what} passed status=0x{status:02x}\n")

    def count_held(self):
        """$STATE/NAME/held: how many commands wait now (under self.lock)."""
        tmp = f"{self.held_file}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{len(self.held)}\n")
        os.rename(tmp, self.held_file)

    def pass_on(self, cmd_id, cdb, iovs):
        try:
            total = sum(n for _, n in iovs)
            if total == 0:
                direction, data = SG_DXFER_NONE, b""
            elif cdb[0] in DATA_OUT:
                direction = SG_DXFER_TO_DEV
                data = b"".join(self.mm[b : b + n] for b, n in iovs)
            else:
                direction, data = SG_DXFER_FROM_DEV, b""
            status, sense, got, note = sg_io(self.sg, cdb, direction, data, total)
            if note:
                self.log.write(f"{time.time():.3f} id={cmd_id} op={cdb[0]:02x}: {note}\n")
            read_len = None
            if direction == SG_DXFER_FROM_DEV:
                off = 0
                for b, n in iovs:
                    chunk = got[off : off + n]
                    if not chunk:
                        break
                    self.mm[b : b + len(chunk)] = chunk
                    off += len(chunk)
                read_len = len(got)
            self.complete(cmd_id, status, sense, read_len)
            return status
        except Exception:  # never leave the initiator waiting
            self.log.write(f"{time.time():.3f} id={cmd_id} error: {traceback.format_exc()}\n")
            self.complete(cmd_id, CHECK_CONDITION, fixed_sense(0x04, 0x44, 0x00))
            return CHECK_CONDITION

    def complete(self, cmd_id, status, sense=b"", read_len=None):
        with self.lock:
            # Out-of-order completion: the answer goes into the oldest command
            # entry not yet completed (every entry before self.pos has been
            # read), tagged with this command's id.
            while True:
                e = self.cmdr_off + self.tail
                len_op = self.u32(e)
                if len_op & 7 == OP_CMD:
                    break
                self.tail = (self.tail + (len_op & ~7)) % self.cmdr_size
            struct.pack_into("<H", self.mm, e + 4, cmd_id)
            self.mm[e + 7] = UFLAG_READ_LEN if read_len else 0
            self.mm[e + RSP_STATUS] = status
            struct.pack_into("<I", self.mm, e + RSP_READ_LEN, read_len or 0)
            sense = sense[:SENSE_SIZE]
            self.mm[e + RSP_SENSE : e + RSP_SENSE + SENSE_SIZE] = sense + bytes(SENSE_SIZE - len(sense))
            self.tail = (self.tail + (len_op & ~7)) % self.cmdr_size
            struct.pack_into("<I", self.mm, MB_CMD_TAIL, self.tail)
            os.write(self.fd, b"\0\0\0\0")


# ------------------------------------------------------------------ set-up


def map_sysfs(map_arg):
    dev = map_arg if map_arg.startswith("/") else f"/dev/mapper/{map_arg}"
    real = os.path.realpath(dev)
    name = os.path.basename(real)
    if not name.startswith("dm-"):
        die(f"{map_arg} is not a device-mapper device ({real})")
    return f"/sys/block/{name}"


def find_backstore(wwid):
    serial = wwid[len(NAA_PREFIX):].lower()
    for f in glob.glob(f"{CFG}/core/*/*/wwn/vpd_unit_serial"):
        s = read(f).rpartition(":")[2].strip().replace("-", "").lower()
        if s and s[:25] == serial[:25]:
            return os.path.dirname(os.path.dirname(f))
    die(f"no LIO backstore has the serial of WWID {wwid}")


def new_tpg(wwn, initiator):
    tpg = f"{CFG}/loopback/{wwn}/tpgt_1"
    os.makedirs(f"{tpg}/lun/lun_0")
    put(f"{tpg}/nexus", initiator)
    addr = read(f"{tpg}/address")  # host:0:tpgt
    host, _, tgt = addr.split(":")
    return tpg, f"{host}:0:{tgt}:0"


def scsi_nodes(hctl, block):
    d = f"/sys/bus/scsi/devices/{hctl}"
    sg = glob.glob(f"{d}/scsi_generic/sg*")
    sd = glob.glob(f"{d}/block/sd*")
    if not sg or (block and not sd):
        return None
    sg = f"/dev/{os.path.basename(sg[0])}"
    sd = f"/dev/{os.path.basename(sd[0])}" if sd else ""
    if not os.path.exists(sg) or (sd and not os.path.exists(sd)):
        return None
    if sd and not os.path.exists(f"/sys/block/{os.path.basename(sd)}"):
        return None
    return sd, sg


def add(map_arg, name, wait_secs):
    sysfs = map_sysfs(map_arg)
    uuid = read(f"{sysfs}/dm/uuid")
    if not uuid.startswith("mpath-"):
        die(f"{map_arg} is not a multipath map (uuid {uuid})")
    wwid = uuid[len("mpath-"):]
    alias = read(f"{sysfs}/dm/name")
    size = int(read(f"{sysfs}/size")) * 512
    backstore = find_backstore(wwid)
    statedir = f"{STATE}/{name}"
    if os.path.exists(statedir):
        die(f"a fault path named {name} exists already")
    os.makedirs(STATE, exist_ok=True)
    idx = len(os.listdir(STATE)) + 1
    os.makedirs(statedir)
    ctl = f"{statedir}/ctl"
    with open(ctl, "w") as f:
        f.write("delay=0 ops=pr\n")
    outer_wwn, outer_init = f"naa.5001405000fa{idx:04x}", f"naa.5001405000fb{idx:04x}"
    inner_wwn, inner_init = f"naa.5001405000fc{idx:04x}", f"naa.5001405000fd{idx:04x}"

    # the inner nexus: no driver binds to it (no sd, no block device)
    inner_tpg, inner_hctl = new_tpg(inner_wwn, inner_init)
    put(AUTOPROBE, 0)
    try:
        os.symlink(backstore, f"{inner_tpg}/lun/lun_0/{os.path.basename(backstore)}")
    finally:
        put(AUTOPROBE, 1)
    _, inner_sg = wait_for(20, f"the inner nexus's sg node ({inner_hctl})", lambda: scsi_nodes(inner_hctl, False))

    # the TCMU device
    dev = f"{CFG}/core/user_0/{name}"
    os.makedirs(dev)
    put(f"{dev}/control", f"dev_config=faultpath/{name},dev_size={size},hw_block_size=512,"
        "max_data_area_mb=16,cmd_ring_size_mb=1")
    put(f"{dev}/attrib/pgr_support", 0)
    put(f"{dev}/attrib/alua_support", 0)
    put(f"{dev}/attrib/tmr_notification", 1)
    put(f"{dev}/attrib/cmd_time_out", CMD_TIME_OUT_S)
    put(f"{dev}/enable", 1)

    def uio_dev():
        for d in glob.glob("/sys/class/uio/uio*"):
            if read(f"{d}/name").endswith(f"/{name}/faultpath/{name}"):
                return d
        return None

    uio = wait_for(10, "the TCMU device's uio node", uio_dev)
    map_size = int(read(f"{uio}/maps/map0/size"), 16)
    uio_node = f"/dev/{os.path.basename(uio)}"
    wait_for(10, uio_node, lambda: os.path.exists(uio_node))

    # the handler, detached; it must run before the outer LUN is linked (the
    # link scans the LUN, through the handler)
    ready = f"{statedir}/ready"
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            if os.fork():
                os._exit(0)
            out = os.open(f"{statedir}/handler.out", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            null = os.open("/dev/null", os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            h = Handler(uio_node, map_size, inner_sg, statedir)
            with open(f"{statedir}/pid", "w") as f:
                f.write(f"{os.getpid()}\n")
            open(ready, "w").close()
            h.run()
        except BaseException:
            traceback.print_exc()
        os._exit(1)
    os.waitpid(pid, 0)
    wait_for(20, "the handler", lambda: os.path.exists(ready))

    # the outer path
    outer_tpg, outer_hctl = new_tpg(outer_wwn, outer_init)
    os.symlink(dev, f"{outer_tpg}/lun/lun_0/{name}")
    sd, sg = wait_for(30, f"the new path's sd and sg nodes ({outer_hctl})", lambda: scsi_nodes(outer_hctl, True))
    got = read(f"/sys/bus/scsi/devices/{outer_hctl}/wwid")
    if got.lower() != f"naa.{wwid[1:]}".lower():
        die(f"{sd} reports WWID {got}, expected naa.{wwid[1:]}")
    if wait_secs:
        slave = f"{sysfs}/slaves/{os.path.basename(sd)}"
        wait_for(wait_secs, f"multipathd to add {sd} to {alias}", lambda: os.path.exists(slave))

    env = {
        "FAULTPATH_NAME": name,
        "FAULTPATH_MAP": alias,
        "FAULTPATH_DEV": sd,
        "FAULTPATH_SG": sg,
        "FAULTPATH_HCTL": outer_hctl,
        "FAULTPATH_INITIATOR": inner_init,
        "FAULTPATH_INNER_SG": inner_sg,
        "FAULTPATH_CTL": ctl,
        "FAULTPATH_LOG": f"{statedir}/log",
        "FAULTPATH_PID": read(f"{statedir}/pid"),
    }
    text = "".join(f"{k}={v}\n" for k, v in env.items())
    with open(f"{statedir}/env", "w") as f:
        f.write(text)
    sys.stdout.write(text)


def set_ctl(name, words):
    ctl = f"{STATE}/{name}/ctl"
    if not os.path.exists(ctl):
        die(f"no fault path named {name}")
    for w in words:
        k, eq, _ = w.partition("=")
        if not eq or k not in ("delay", "ops"):
            die(f"unknown setting '{w}' (delay=MS, ops=pr|all|HEX,...)")
    tmp = f"{ctl}.tmp"
    with open(tmp, "w") as f:
        f.write(" ".join(words) + "\n")
    os.rename(tmp, ctl)


def main(argv):
    if len(argv) >= 3 and argv[0] == "add":
        wait = 30
        if len(argv) == 5 and argv[3] == "--wait":
            wait = int(argv[4])
        elif len(argv) != 3:
            die("usage: faultpath.py add MAP NAME [--wait SECS]")
        add(argv[1], argv[2], wait)
    elif len(argv) >= 2 and argv[0] == "set":
        set_ctl(argv[1], argv[2:])
    elif len(argv) == 2 and argv[0] == "show":
        d = f"{STATE}/{argv[1]}"
        sys.stdout.write(read(f"{d}/env") + "\nctl: " + read(f"{d}/ctl") + "\n")
    else:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
