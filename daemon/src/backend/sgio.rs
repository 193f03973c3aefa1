//! Raw SG_IO pass-through: the backend for every SCSI device that is not a
//! dm-multipath map.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd};

use super::{BackendError, Command, PrBackend};
use reservd_proto::cdb::{transfer_length, PERSISTENT_RESERVE_IN, PERSISTENT_RESERVE_OUT};
use reservd_proto::sense::{failure_answer, Answer, Failure, Status, SENSE_SIZE};
use reservd_proto::sg::{
    SgIoHdr, DID_NO_CONNECT, DRIVER_TIMEOUT_MASK, SG_DXFER_FROM_DEV, SG_DXFER_NONE,
    SG_DXFER_TO_DEV, SG_IO,
};
use reservd_proto::wire::{DATA_SIZE, OP_CLEANUP};

/// Data direction of one SG_IO call.
pub enum Transfer<'a> {
    None,
    ToDevice(&'a [u8]),
    FromDevice(&'a mut [u8]),
}

/// Issue one SCSI command with SG_IO and turn the result into an answer,
/// following qemu-pr-helper's status rules. Returns the answer (without
/// data) and how many bytes the device transferred into a
/// [`Transfer::FromDevice`] buffer (0 unless GOOD).
pub fn sg_io(
    fd: BorrowedFd<'_>,
    cdb: &[u8],
    xfer: Transfer<'_>,
    timeout_ms: u32,
) -> (Answer, usize) {
    let (answer, transferred, _) = sg_io_reached(fd, cdb, xfer, timeout_ms);
    (answer, transferred)
}

/// [`sg_io`], and whether the command reached the device. It did not when
/// the kernel refused it first: the ioctl failed (ENODEV for a SCSI device
/// set offline), or the SCSI midlayer did not send it (host status
/// DID_NO_CONNECT: the device is offline or gone). Such a command may go
/// down another path of a map; nothing of it was executed.
pub fn sg_io_reached(
    fd: BorrowedFd<'_>,
    cdb: &[u8],
    xfer: Transfer<'_>,
    timeout_ms: u32,
) -> (Answer, usize, bool) {
    let mut sense = [0u8; SENSE_SIZE];
    let (dir, ptr, len) = match xfer {
        Transfer::None => (SG_DXFER_NONE, std::ptr::null_mut(), 0usize),
        Transfer::ToDevice(b) => (SG_DXFER_TO_DEV, b.as_ptr() as *mut libc::c_void, b.len()),
        Transfer::FromDevice(b) => (
            SG_DXFER_FROM_DEV,
            b.as_mut_ptr() as *mut libc::c_void,
            b.len(),
        ),
    };
    let mut hdr = SgIoHdr {
        interface_id: b'S' as i32,
        dxfer_direction: dir,
        cmd_len: cdb.len() as u8,
        mx_sb_len: SENSE_SIZE as u8,
        iovec_count: 0,
        dxfer_len: len as u32,
        dxferp: ptr,
        cmdp: cdb.as_ptr(),
        sbp: sense.as_mut_ptr(),
        timeout: timeout_ms,
        flags: 0,
        pack_id: 0,
        usr_ptr: std::ptr::null_mut(),
        status: 0,
        masked_status: 0,
        msg_status: 0,
        sb_len_wr: 0,
        host_status: 0,
        driver_status: 0,
        resid: 0,
        duration: 0,
        info: 0,
    };
    // SAFETY: `hdr` is a correctly laid out sg_io_hdr whose pointers (cdb,
    // sense, data) reference buffers that outlive this call, with lengths
    // matching cmd_len, mx_sb_len and dxfer_len; the kernel writes only
    // within those lengths. A non-SG fd makes the ioctl fail with ENOTTY.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), SG_IO as _, &mut hdr as *mut SgIoHdr) };
    if r < 0 {
        let errno = std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        return (failure_answer(Failure::Errno(errno)), 0, false);
    }
    if hdr.host_status != 0 {
        let reached = hdr.host_status != DID_NO_CONNECT;
        return (
            failure_answer(Failure::HostStatus(hdr.host_status)),
            0,
            reached,
        );
    }
    if hdr.driver_status & DRIVER_TIMEOUT_MASK != 0 {
        return (failure_answer(Failure::DriverTimeout), 0, true);
    }
    let status = Status(hdr.status);
    if status != Status::GOOD {
        let n = (hdr.sb_len_wr as usize).min(SENSE_SIZE);
        let answer = if status == Status::CHECK_CONDITION {
            Answer::with_device_sense(status, &sense[..n])
        } else {
            Answer::status(status)
        };
        return (answer, 0, true);
    }
    let transferred = len.saturating_sub(hdr.resid.max(0) as usize);
    (Answer::good(Vec::new()), transferred, true)
}

/// The SG_IO backend.
pub struct SgIo {
    /// Per-command timeout in milliseconds.
    pub timeout_ms: u32,
}

/// Default SG_IO timeout: long enough for an array busy with a failover.
pub const DEFAULT_TIMEOUT_MS: u32 = 30_000;

impl Default for SgIo {
    fn default() -> Self {
        SgIo {
            timeout_ms: DEFAULT_TIMEOUT_MS,
        }
    }
}

impl SgIo {
    /// A PR IN or OUT: its answer, and whether it reached the device
    /// ([`sg_io_reached`]).
    pub fn pr_command(&self, cmd: &Command<'_>) -> (Answer, bool) {
        // PR IN/OUT are 10-byte CDBs; the rest of the 16 bytes is padding.
        let cdb = &cmd.cdb[..10];
        if cmd.cdb[0] == PERSISTENT_RESERVE_IN {
            // The device sends at most the allocation length.
            let len = transfer_length(cmd.cdb).min(DATA_SIZE);
            return with_zeroed_buffer(len, |buf| {
                let (mut answer, transferred, reached) =
                    sg_io_reached(cmd.fd, cdb, Transfer::FromDevice(buf), self.timeout_ms);
                if answer.status == Status::GOOD {
                    answer.data = buf[..transferred].to_vec();
                    // The kernel's count: the device wrote no further.
                    ((answer, reached), transferred)
                } else {
                    // Whatever happened, it may have written anywhere.
                    ((answer, reached), len)
                }
            });
        }
        let xfer = if cmd.params.is_empty() {
            Transfer::None
        } else {
            Transfer::ToDevice(cmd.params)
        };
        let (answer, _, reached) = sg_io_reached(cmd.fd, cdb, xfer, self.timeout_ms);
        (answer, reached)
    }
}

impl PrBackend for SgIo {
    fn execute(&self, cmd: &Command<'_>) -> Result<Answer, BackendError> {
        match cmd.cdb[0] {
            PERSISTENT_RESERVE_IN | PERSISTENT_RESERVE_OUT => Ok(self.pr_command(cmd).0),
            // CLEANUP concerns multipathd only; nothing to do on a plain device.
            OP_CLEANUP => Ok(Answer::status(Status::GOOD)),
            // The wire decoder lets no other opcode through; never forward one.
            _ => Ok(Answer::check(
                reservd_proto::sense::SenseCode::INVALID_OPCODE,
            )),
        }
    }
}

/// Lend `f` `len` bytes of zeros for the device to write PR IN data into.
/// Each thread keeps one buffer from command to command, all zeros between
/// them: `f` returns how many leading bytes it may have let the device
/// write, and those are zeroed again (all of them if `f` panics). So a
/// command never sees another's data, as with a fresh zeroed buffer, while
/// a command that reads 8 bytes of an 8 KiB allocation length zeroes 8
/// bytes, not 8 KiB (allocating and zeroing the whole buffer was the
/// largest part of reservd's own user time per request on an emulated CPU).
fn with_zeroed_buffer<T>(len: usize, f: impl FnOnce(&mut [u8]) -> (T, usize)) -> T {
    use std::cell::RefCell;
    thread_local! {
        static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    /// Zeroes the first `dirty` bytes when dropped, also while unwinding.
    struct Rezero<'a> {
        buf: &'a mut [u8],
        dirty: usize,
    }
    impl Drop for Rezero<'_> {
        fn drop(&mut self) {
            let n = self.dirty.min(self.buf.len());
            self.buf[..n].fill(0);
        }
    }
    BUFFER.with(|cell| {
        let Ok(mut v) = cell.try_borrow_mut() else {
            // Lent already (never on a server thread): a fresh one.
            return f(&mut vec![0u8; len]).0;
        };
        if v.len() < len {
            v.resize(len, 0);
        }
        let mut lent = Rezero {
            buf: &mut v[..len],
            dirty: len,
        };
        let (out, dirty) = f(lent.buf);
        lent.dirty = dirty;
        out
    })
}

#[cfg(test)]
mod tests {
    use super::{sg_io_reached, with_zeroed_buffer, Command, SgIo, Status, Transfer};
    use std::os::fd::AsFd;

    #[test]
    fn a_command_the_kernel_refuses_did_not_reach_the_device() {
        // A regular file: the SG_IO ioctl itself fails (ENOTTY), as it
        // fails with ENODEV on a SCSI device set offline.
        let path = std::env::temp_dir().join(format!("reservd-sgio-{}", std::process::id()));
        std::fs::write(&path, [0u8; 512]).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let mut buf = [0u8; 8];
        let cdb = [0x5e, 0, 0, 0, 0, 0, 0, 0, 8, 0];
        let (answer, transferred, reached) =
            sg_io_reached(f.as_fd(), &cdb, Transfer::FromDevice(&mut buf), 1000);
        assert!(!reached);
        assert_eq!(transferred, 0);
        assert_eq!(answer.status, Status::CHECK_CONDITION);
        let (a, reached) = SgIo::default().pr_command(&Command {
            nexus: 0,
            peer: None,
            fd: f.as_fd(),
            cdb: &reservd_proto::cdb::pad16(&cdb),
            params: &[],
        });
        assert!(!reached);
        assert_eq!(a, answer);
    }

    #[test]
    fn the_buffer_is_zeros_again_after_what_was_written() {
        with_zeroed_buffer(64, |b| {
            assert_eq!(b.len(), 64);
            b[..10].fill(0xaa);
            ((), 10)
        });
        with_zeroed_buffer(64, |b| {
            assert!(b.iter().all(|&x| x == 0), "left over: {b:?}");
            b.fill(0xbb);
            ((), 64)
        });
        // Shorter, then longer than before: zeros throughout.
        with_zeroed_buffer(8, |b| {
            assert_eq!(b, &[0u8; 8][..]);
            ((), 0)
        });
        with_zeroed_buffer(128, |b| {
            assert!(b.iter().all(|&x| x == 0), "left over: {b:?}");
            ((), 0)
        });
    }

    #[test]
    fn a_panic_while_lent_leaves_zeros() {
        let r = std::panic::catch_unwind(|| {
            with_zeroed_buffer(32, |b| -> ((), usize) {
                b.fill(0xcc);
                panic!("device data nobody foresaw");
            })
        });
        assert!(r.is_err());
        with_zeroed_buffer(32, |b| {
            assert!(b.iter().all(|&x| x == 0), "left over: {b:?}");
            ((), 0)
        });
    }

    #[test]
    fn a_nested_loan_gets_its_own_zeros() {
        with_zeroed_buffer(16, |outer| {
            outer.fill(1);
            with_zeroed_buffer(16, |inner| {
                assert!(inner.iter().all(|&x| x == 0));
                inner.fill(2);
                ((), 16)
            });
            assert!(outer.iter().all(|&x| x == 1));
            ((), 16)
        });
    }
}
