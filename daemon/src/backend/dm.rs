//! Recognising dm-multipath maps: `DM_TABLE_STATUS` on
//! `/dev/mapper/control` with `dev = st_rdev`, as qemu-pr-helper does.
//!
//! Every command asks afresh (a map can be reloaded or removed at any
//! time, so nothing is cached), except for what cannot change while
//! reservd holds the control node open: device-mapper's block major, read
//! from `/proc/devices` at start-up. A block device with another major (a
//! SCSI disk) is not a map, with no ioctl. No failure here stops reservd: ENXIO means
//! "not a device-mapper device"; any other error is logged and the fd is
//! treated as not multipath, so the command goes to SG_IO. Without a
//! usable `/dev/mapper/control` (no device-mapper in the kernel, or no
//! permission) there is no [`DmControl`] at all, and every fd goes to
//! SG_IO.
//!
//! For the commands reservd runs on a map's paths itself (see
//! [`reservd_proto::onenexus`]), [`DmControl::map_paths`] reads the map's paths and
//! whether the kernel uses each (the same status), and
//! [`DmControl::suspend`] / [`DmControl::resume`] suspend the map without
//! flushing (I/O queues meanwhile) and resume it, as multipath-tools does
//! around a self-preemption.
#![allow(unsafe_code)]

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

pub const CONTROL_PATH: &str = "/dev/mapper/control";

const DM_VERSION_MAJOR: u32 = 4;
/// `_IOWR(0xfd, nr, struct dm_ioctl)`, struct dm_ioctl being 312 bytes.
const fn dm_ioctl(nr: u64) -> u64 {
    0xc138_fd00 | nr
}
/// The interface's version; reservd checks it at start-up.
pub const DM_VERSION: u64 = dm_ioctl(0);
/// libdevmapper's, for libmpathpersist: list the maps.
pub const DM_LIST_DEVICES: u64 = dm_ioctl(2);
/// Suspend (with DM_SUSPEND_FLAG) or resume a map.
pub const DM_DEV_SUSPEND: u64 = dm_ioctl(6);
/// libdevmapper's: a map's status.
pub const DM_DEV_STATUS: u64 = dm_ioctl(7);
/// libdevmapper's: a map's dependencies.
pub const DM_TABLE_DEPS: u64 = dm_ioctl(11);
/// A map's table status: is this a multipath map, and its paths.
pub const DM_TABLE_STATUS: u64 = dm_ioctl(12);
/// libdevmapper's: the targets' versions.
pub const DM_LIST_VERSIONS: u64 = dm_ioctl(13);
/// libdevmapper's: one target's version.
pub const DM_GET_TARGET_VERSION: u64 = dm_ioctl(17);
const DM_SUSPEND_FLAG: u32 = 1 << 1;
const DM_SKIP_LOCKFS_FLAG: u32 = 1 << 10;
const DM_NOFLUSH_FLAG: u32 = 1 << 11;
const DM_BUFFER_FULL_FLAG: u32 = 1 << 8;
const DM_IOCTL_SIZE: usize = 312;
const DM_TARGET_SPEC_SIZE: usize = 40;
/// Room for the header, one target spec and its status string; a longer
/// status only sets DM_BUFFER_FULL_FLAG, the first spec still fits.
const BUFFER_SIZE: usize = 4096;

/// A `struct dm_ioctl` (linux/dm-ioctl.h: `version[3]`@0, `data_size`@12,
/// `data_start`@16, `target_count`@20, `flags`@28, `dev`@40, 312 bytes in
/// all) followed by its data area, as one aligned byte buffer.
#[repr(C, align(8))]
struct Buffer([u8; BUFFER_SIZE]);

impl Buffer {
    fn new(dev: u64) -> Box<Buffer> {
        let mut b = Box::new(Buffer([0; BUFFER_SIZE]));
        b.put(0, DM_VERSION_MAJOR);
        b.put(12, BUFFER_SIZE as u32);
        b.put(16, DM_IOCTL_SIZE as u32);
        b.put(28, DM_NOFLUSH_FLAG);
        b.0[40..48].copy_from_slice(&dev.to_ne_bytes());
        b
    }

    fn put(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    }

    fn get(&self, at: usize) -> u32 {
        u32::from_ne_bytes(self.0[at..at + 4].try_into().unwrap())
    }
}

/// What a file descriptor is, as far as routing goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    /// A dm-multipath map, `dm-<minor>`.
    Multipath { minor: u32 },
    /// Anything else (another device-mapper target, a SCSI disk, a file).
    Other,
}

/// An open `/dev/mapper/control`.
pub struct DmControl {
    fd: OwnedFd,
    /// device-mapper's block major; `None` if it could not be read (then
    /// every block device is asked about).
    major: Option<u32>,
}

/// device-mapper's major from the text of `/proc/devices`: the
/// "device-mapper" line of its "Block devices:" section.
pub fn dm_block_major(proc_devices: &str) -> Option<u32> {
    let block = proc_devices.split("Block devices:").nth(1)?;
    block.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        let major = w.next()?.parse().ok()?;
        (w.next()? == "device-mapper" && w.next().is_none()).then_some(major)
    })
}

/// Why device-mapper cannot be used.
#[derive(Debug)]
pub struct DmUnavailable {
    pub path: String,
    pub error: io::Error,
}

impl std::fmt::Display for DmUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.error.raw_os_error() {
            Some(libc::ENOENT) => write!(f, "{} does not exist", self.path),
            Some(libc::ENODEV) | Some(libc::ENXIO) => {
                write!(f, "{}: no device-mapper driver in the kernel", self.path)
            }
            _ => write!(f, "{}: {}", self.path, self.error),
        }
    }
}

impl DmControl {
    /// Open the control node and check that the kernel speaks ioctl
    /// interface version 4.
    pub fn open() -> Result<DmControl, DmUnavailable> {
        DmControl::open_at(Path::new(CONTROL_PATH))
    }

    pub fn open_at(path: &Path) -> Result<DmControl, DmUnavailable> {
        let fail = |error| DmUnavailable {
            path: path.display().to_string(),
            error,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(fail)?;
        let meta = file.metadata().map_err(fail)?;
        if !meta.file_type().is_char_device() {
            return Err(fail(io::Error::other("not a character device")));
        }
        // The control node is open: the driver (and its major) stays.
        let major = std::fs::read_to_string("/proc/devices")
            .ok()
            .and_then(|t| dm_block_major(&t));
        let dm = DmControl {
            fd: file.into(),
            major,
        };
        let mut b = Buffer::new(0);
        dm.ioctl(DM_VERSION, &mut b).map_err(fail)?;
        if b.get(0) != DM_VERSION_MAJOR {
            return Err(fail(io::Error::other(format!(
                "device-mapper ioctl interface {}.{}.{}, reservd needs 4.x",
                b.get(0),
                b.get(4),
                b.get(8)
            ))));
        }
        Ok(dm)
    }

    fn ioctl(&self, request: u64, b: &mut Buffer) -> io::Result<()> {
        // SAFETY: `b` is a dm_ioctl header followed by its data area, all in
        // one allocation of `data_size` bytes; the kernel reads and writes
        // within `data_size`. `self.fd` is an open control node.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), request as _, b.0.as_mut_ptr()) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Whether `fd` is a dm-multipath map. Never fails: anything that goes
    /// wrong is logged and means "not multipath".
    pub fn probe(&self, fd: BorrowedFd<'_>) -> MapKind {
        let st = match fstat(fd) {
            Ok(st) => st,
            Err(e) => {
                log::warn!("fstat on a client's file descriptor failed: {e}; using SG_IO");
                return MapKind::Other;
            }
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFBLK {
            return MapKind::Other;
        }
        if self.major.is_some_and(|m| libc::major(st.st_rdev) != m) {
            return MapKind::Other;
        }
        let mut b = Buffer::new(st.st_rdev);
        match self.ioctl(DM_TABLE_STATUS, &mut b) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return MapKind::Other,
            Err(e) => {
                log::warn!(
                    "DM_TABLE_STATUS for device {}:{} failed: {e}; using SG_IO",
                    libc::major(st.st_rdev),
                    libc::minor(st.st_rdev)
                );
                return MapKind::Other;
            }
        }
        // target_count, then the first target spec at data_start.
        if b.get(20) == 0 {
            return MapKind::Other;
        }
        if target_is_multipath(&b.0, b.get(16) as usize) {
            MapKind::Multipath {
                minor: libc::minor(st.st_rdev),
            }
        } else {
            MapKind::Other
        }
    }

    /// The block device number of the map `fd` opens.
    fn map_dev(fd: BorrowedFd<'_>) -> io::Result<u64> {
        let st = fstat(fd)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFBLK {
            return Err(io::Error::from_raw_os_error(libc::ENOTBLK));
        }
        Ok(st.st_rdev)
    }

    /// The paths of the multipath map `fd` opens, and whether the kernel
    /// uses each.
    pub fn map_paths(&self, fd: BorrowedFd<'_>) -> io::Result<Vec<MapPath>> {
        let mut b = Buffer::new(Self::map_dev(fd)?);
        self.ioctl(DM_TABLE_STATUS, &mut b)?;
        if b.get(28) & DM_BUFFER_FULL_FLAG != 0 {
            return Err(io::Error::other("the map's status does not fit 4 KiB"));
        }
        let start = b.get(16) as usize;
        if b.get(20) != 1 || !target_is_multipath(&b.0, start) {
            return Err(io::Error::other(
                "not a multipath map (one multipath target)",
            ));
        }
        let status = target_status(&b.0, start)
            .ok_or_else(|| io::Error::other("no status string in DM_TABLE_STATUS"))?;
        multipath_paths(status)
            .ok_or_else(|| io::Error::other(format!("unexpected multipath status: {status}")))
    }

    /// Suspend the map `fd` opens without flushing: I/O queues until
    /// [`DmControl::resume`]. Filesystems on it are not frozen.
    pub fn suspend(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let mut b = Buffer::new(Self::map_dev(fd)?);
        b.put(28, DM_SUSPEND_FLAG | DM_SKIP_LOCKFS_FLAG | DM_NOFLUSH_FLAG);
        self.ioctl(DM_DEV_SUSPEND, &mut b)
    }

    /// Resume the map `fd` opens (its live table; no udev cookie).
    pub fn resume(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let mut b = Buffer::new(Self::map_dev(fd)?);
        b.put(28, DM_SKIP_LOCKFS_FLAG | DM_NOFLUSH_FLAG);
        self.ioctl(DM_DEV_SUSPEND, &mut b)
    }
}

/// The device node of the block device `dev`: `/dev/` and the DEVNAME of
/// its uevent.
pub fn block_node(dev: (u32, u32)) -> io::Result<std::path::PathBuf> {
    let uevent = std::fs::read_to_string(format!("/sys/dev/block/{}:{}/uevent", dev.0, dev.1))?;
    uevent
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .filter(|n| !n.is_empty() && !n.contains(".."))
        .map(|n| Path::new("/dev").join(n))
        .ok_or_else(|| io::Error::other(format!("no DEVNAME for block device {}:{}", dev.0, dev.1)))
}

/// One path of a multipath map, as the kernel's table status lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapPath {
    /// The path's block device number (major, minor).
    pub dev: (u32, u32),
    /// Whether the kernel uses it ("A"), or has failed it ("F").
    pub active: bool,
}

/// The paths in a dm-multipath status line (STATUSTYPE_INFO), in table
/// order: `<#features> <features> <#hw args> <hw args> <#pgs> <next pg>`,
/// then for each priority group `<state> <#ps status> <ps status>
/// <#paths> <#ps info per path>` and for each path `<major:minor> <A|F>
/// <fail count> <ps info...>`. `None` if the line does not parse.
pub fn multipath_paths(status: &str) -> Option<Vec<MapPath>> {
    let mut w = status.split_whitespace();
    let skip_counted = |w: &mut std::str::SplitWhitespace<'_>| -> Option<()> {
        let n: usize = w.next()?.parse().ok()?;
        for _ in 0..n {
            w.next()?;
        }
        Some(())
    };
    skip_counted(&mut w)?; // features
    skip_counted(&mut w)?; // hardware handler
    let groups: usize = w.next()?.parse().ok()?;
    w.next()?; // next priority group
    let mut paths = Vec::new();
    for _ in 0..groups {
        w.next()?; // group state: A, E or D
        skip_counted(&mut w)?; // path selector status
        let n: usize = w.next()?.parse().ok()?;
        let info: usize = w.next()?.parse().ok()?;
        for _ in 0..n {
            let (major, minor) = w.next()?.split_once(':')?;
            let active = match w.next()? {
                "A" => true,
                "F" => false,
                _ => return None,
            };
            w.next()?; // fail count
            for _ in 0..info {
                w.next()?;
            }
            paths.push(MapPath {
                dev: (major.parse().ok()?, minor.parse().ok()?),
                active,
            });
        }
    }
    Some(paths)
}

/// Whether the first `struct dm_target_spec` at `start` names the
/// "multipath" target (its `target_type[16]` at offset 24).
fn target_is_multipath(buf: &[u8], start: usize) -> bool {
    let Some(spec) = buf.get(start..start + DM_TARGET_SPEC_SIZE) else {
        return false;
    };
    let ty = &spec[24..40];
    let end = ty.iter().position(|&c| c == 0).unwrap_or(ty.len());
    &ty[..end] == b"multipath"
}

/// The status string after the first `struct dm_target_spec` at `start`.
fn target_status(buf: &[u8], start: usize) -> Option<&str> {
    let rest = buf.get(start + DM_TARGET_SPEC_SIZE..)?;
    let end = rest.iter().position(|&c| c == 0)?;
    std::str::from_utf8(&rest[..end]).ok()
}

/// `fstat(2)` itself. The C library's `fstat` is `fstatat(fd, "",
/// AT_EMPTY_PATH)`, which on the kernels of current enterprise
/// distributions copies and looks up the empty path name first; this runs
/// for every command.
fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: `fd` is an open descriptor (borrowed for the call) and `st`
    // is a writable `struct stat` of the size the kernel fills for this
    // architecture's fstat.
    let r = unsafe { libc::syscall(libc::SYS_fstat, fd.as_raw_fd(), st.as_mut_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled `st` (and it was zeroed before).
    Ok(unsafe { st.assume_init() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(ty: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; DM_IOCTL_SIZE + DM_TARGET_SPEC_SIZE + 8];
        b[DM_IOCTL_SIZE + 24..DM_IOCTL_SIZE + 24 + ty.len()].copy_from_slice(ty);
        b
    }

    #[test]
    fn target_type_is_compared_exactly() {
        assert!(target_is_multipath(&spec(b"multipath"), DM_IOCTL_SIZE));
        assert!(!target_is_multipath(&spec(b"linear"), DM_IOCTL_SIZE));
        assert!(!target_is_multipath(&spec(b"multipath-x"), DM_IOCTL_SIZE));
        assert!(!target_is_multipath(&spec(b"multipat"), DM_IOCTL_SIZE));
        // A full 16-byte name without NUL.
        assert!(!target_is_multipath(
            &spec(b"multipathmultipa"),
            DM_IOCTL_SIZE
        ));
        // data_start beyond the buffer.
        assert!(!target_is_multipath(&spec(b"multipath"), BUFFER_SIZE));
    }

    #[test]
    fn missing_control_node_is_reported_not_fatal() {
        let e = DmControl::open_at(Path::new("/nonexistent/mapper/control"))
            .err()
            .expect("must fail");
        assert_eq!(e.error.raw_os_error(), Some(libc::ENOENT));
        assert!(e.to_string().contains("does not exist"));
    }

    #[test]
    fn a_regular_file_is_not_a_control_node() {
        let f = std::env::temp_dir().join(format!("reservd-dm-{}", std::process::id()));
        std::fs::write(&f, b"").unwrap();
        let e = DmControl::open_at(&f).err().expect("must fail");
        std::fs::remove_file(&f).unwrap();
        assert!(e.to_string().contains("not a character device"));
    }

    /// A control "node" that is not one: every DM ioctl fails (ENOTTY).
    fn fake_control() -> DmControl {
        DmControl {
            fd: std::fs::File::open("/dev/null").unwrap().into(),
            major: None,
        }
    }

    #[test]
    fn device_mapper_major_comes_from_the_block_section() {
        let text = "Character devices:\n  1 mem\n254 device-mapper\n 10 misc\n\n\
                    Block devices:\n  7 loop\n  8 sd\n  9 md\n253 device-mapper\n259 blkext\n";
        // The character-device line with the same name is not taken.
        assert_eq!(dm_block_major(text), Some(253));
        assert_eq!(
            dm_block_major("Block devices:\n  8 sd\n254 device-mapper\n"),
            Some(254)
        );
        // No device-mapper, no block section, a longer name, garbage.
        assert_eq!(dm_block_major("Block devices:\n  8 sd\n"), None);
        assert_eq!(
            dm_block_major("Character devices:\n254 device-mapper\n"),
            None
        );
        assert_eq!(
            dm_block_major("Block devices:\n254 device-mapper-x\n"),
            None
        );
        assert_eq!(dm_block_major("Block devices:\nxx device-mapper\n"), None);
        assert_eq!(dm_block_major(""), None);
    }

    #[test]
    fn this_machines_proc_devices_parses_when_dm_is_loaded() {
        let text = std::fs::read_to_string("/proc/devices").unwrap();
        let listed = text
            .split("Block devices:")
            .nth(1)
            .is_some_and(|b| b.contains(" device-mapper\n"));
        assert_eq!(dm_block_major(&text).is_some(), listed);
    }

    #[test]
    fn regular_files_are_never_multipath() {
        use std::os::fd::AsFd;
        let f = std::fs::File::open("/proc/self/exe").unwrap();
        // Decided by fstat alone: no DM ioctl is needed.
        assert_eq!(fake_control().probe(f.as_fd()), MapKind::Other);
    }

    #[test]
    #[ignore = "needs root (mknod); run by scripts/test.sh"]
    fn failing_dm_ioctl_means_not_multipath() {
        use std::os::fd::AsFd;
        use std::os::unix::fs::OpenOptionsExt;
        let node = std::env::temp_dir().join(format!("reservd-blk-{}", std::process::id()));
        let _ = std::fs::remove_file(&node);
        nix::sys::stat::mknod(
            &node,
            nix::sys::stat::SFlag::S_IFBLK,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            nix::sys::stat::makedev(8, 0),
        )
        .expect("mknod (needs root)");
        // O_PATH: fstat works without a driver behind the node.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(&node)
            .unwrap();
        std::fs::remove_file(&node).unwrap();
        assert_eq!(fake_control().probe(f.as_fd()), MapKind::Other);
    }

    #[test]
    fn multipath_status_lines() {
        // Two paths in one round-robin group (no per-path selector info).
        let p = multipath_paths("2 0 0 0 1 1 A 0 2 0 8:0 A 0 8:16 F 3 ").unwrap();
        assert_eq!(
            p,
            vec![
                MapPath {
                    dev: (8, 0),
                    active: true
                },
                MapPath {
                    dev: (8, 16),
                    active: false
                },
            ]
        );
        // queue_if_no_path features, an ALUA handler, two groups with
        // service-time's two info words per path.
        let p = multipath_paths(
            "3 queue_if_no_path queue_mode bio 1 alua 2 1 A 0 1 2 65:16 A 0 0 1 E 0 1 2 65:32 A 1 0 1",
        )
        .unwrap();
        assert_eq!(
            p.iter().map(|p| p.dev).collect::<Vec<_>>(),
            vec![(65, 16), (65, 32)]
        );
        // The status of a map with no paths, and garbage.
        assert_eq!(multipath_paths("2 0 0 0 0 0"), Some(vec![]));
        assert_eq!(multipath_paths("2 0 0 0 1 1 A 0 1 0 8:0 X 0"), None);
        assert_eq!(multipath_paths("2 0 0 0 1 1 A 0 2 0 8:0 A 0"), None);
        assert_eq!(multipath_paths("x"), None);
        assert_eq!(multipath_paths(""), None);
    }

    #[test]
    fn status_string_follows_the_target_spec() {
        let mut b = spec(b"multipath");
        b.truncate(DM_IOCTL_SIZE + DM_TARGET_SPEC_SIZE);
        b.extend_from_slice(b"2 0 0 0 0 0\0junk");
        assert_eq!(target_status(&b, DM_IOCTL_SIZE), Some("2 0 0 0 0 0"));
        // No NUL: nothing.
        b.truncate(DM_IOCTL_SIZE + DM_TARGET_SPEC_SIZE + 4);
        assert_eq!(target_status(&b, DM_IOCTL_SIZE), None);
    }

    #[test]
    fn map_operations_on_a_non_block_fd_fail_cleanly() {
        use std::os::fd::AsFd;
        let f = std::fs::File::open("/proc/self/exe").unwrap();
        let dm = fake_control();
        assert!(dm.map_paths(f.as_fd()).is_err());
        assert!(dm.suspend(f.as_fd()).is_err());
        assert!(dm.resume(f.as_fd()).is_err());
    }

    #[test]
    fn block_nodes_come_from_sysfs() {
        // /dev/null's major:minor is a character device: no block entry.
        assert!(block_node((1, 3)).is_err());
    }

    #[test]
    fn header_layout() {
        let b = Buffer::new(0x0000_0800_0000_0010);
        assert_eq!(b.get(0), 4);
        assert_eq!(b.get(12), BUFFER_SIZE as u32);
        assert_eq!(b.get(16), 312);
        assert_eq!(b.get(28), 0x800);
        assert_eq!(&b.0[40..48], &0x0000_0800_0000_0010u64.to_ne_bytes());
        assert!(b.0[48..].iter().all(|&c| c == 0));
    }
}
