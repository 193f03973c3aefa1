//! The exported `ioctl`, and every access to the memory the caller's
//! `sg_io_hdr` points to (CDB, data buffer or `sg_iovec`s, sense buffer).

use std::ffi::{c_int, c_ulong, c_void};
use std::os::fd::BorrowedFd;
use std::sync::OnceLock;
use std::time::Instant;

use reservd_proto::cdb::PERSISTENT_RESERVE_IN;

use crate::route;
use crate::translate::{complete, gather, is_pr, prepare, scatter};
use reservd_proto::sg::{SgIoHdr, SgIovec, SG_IO};

/// The C library's `int ioctl(int, unsigned long, ...)`, called as the
/// variadic function it is.
type RealIoctl = unsafe extern "C" fn(c_int, c_ulong, ...) -> c_int;

fn real_ioctl() -> Option<RealIoctl> {
    static REAL: OnceLock<usize> = OnceLock::new();
    let addr = *REAL.get_or_init(|| {
        // SAFETY: dlsym only looks a NUL-terminated name up; RTLD_NEXT
        // finds the next `ioctl` after this library, the C library's.
        unsafe { libc::dlsym(libc::RTLD_NEXT, c"ioctl".as_ptr()) as usize }
    });
    (addr != 0).then(|| {
        // SAFETY: the address is that of the C library's ioctl, whose
        // prototype is `RealIoctl`.
        unsafe { std::mem::transmute::<usize, RealIoctl>(addr) }
    })
}

fn set_errno(e: c_int) {
    // SAFETY: __errno_location returns this thread's errno, always valid.
    unsafe { *libc::__errno_location() = e };
}

/// `int ioctl(int fd, unsigned long request, ...)`, interposed.
///
/// It is defined with one fixed third argument instead of `...`, which
/// stable Rust cannot define. On x86_64 (System V ABI) that is sound: a
/// variadic call passes its arguments in the same registers as a
/// non-variadic one (rdi, rsi, rdx) and only adds the count of vector
/// registers used in al, which a non-variadic callee ignores. An ioctl
/// takes at most one argument, an integer or a pointer, so `arg` is it;
/// a caller that passes none leaves rdx undefined, and `arg` is then
/// only handed on, unread, to the C library's ioctl, which would read the
/// same register. The module is built for x86_64 Linux only.
///
/// # Safety
///
/// As for the C library's ioctl: for SG_IO, `arg` points to a valid
/// `struct sg_io_hdr` whose pointers are valid for the lengths it gives.
#[no_mangle]
pub unsafe extern "C" fn ioctl(fd: c_int, request: c_ulong, arg: *mut c_void) -> c_int {
    if request == SG_IO && fd >= 0 && !arg.is_null() {
        // SAFETY: SG_IO's argument is a `struct sg_io_hdr` the caller owns
        // for the whole call, read and written here as the kernel would.
        let hdr = unsafe { &mut *arg.cast::<SgIoHdr>() };
        if let Some(cdb) = pr_cdb(hdr) {
            // SAFETY: `fd` is the caller's open descriptor (checked >= 0;
            // a closed one makes sendmsg fail), borrowed for this call.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            return match pr_command(fd, hdr, &cdb) {
                Ok(()) => 0,
                Err(e) => {
                    set_errno(e);
                    -1
                }
            };
        }
    }
    match real_ioctl() {
        // SAFETY: the caller's arguments, handed on unchanged.
        Some(real) => unsafe { real(fd, request, arg) },
        None => {
            set_errno(libc::ENOSYS);
            -1
        }
    }
}

/// The CDB of an SG_IO call (interface 'S') carrying PR IN or PR OUT.
fn pr_cdb(hdr: &SgIoHdr) -> Option<Vec<u8>> {
    if hdr.interface_id != b'S' as i32 || hdr.cmd_len == 0 || hdr.cmdp.is_null() {
        return None;
    }
    // SAFETY: SG_IO requires `cmdp` to point to `cmd_len` bytes of CDB.
    let cdb = unsafe { std::slice::from_raw_parts(hdr.cmdp, hdr.cmd_len as usize) };
    is_pr(cdb[0]).then(|| cdb.to_vec())
}

/// The data buffer: `dxferp` itself, or the `sg_iovec`s it points to.
fn pieces(hdr: &SgIoHdr) -> Result<Vec<(*mut u8, usize)>, c_int> {
    let all = if hdr.iovec_count == 0 {
        vec![(hdr.dxferp.cast::<u8>(), hdr.dxfer_len as usize)]
    } else {
        if hdr.dxferp.is_null() {
            return Err(libc::EFAULT);
        }
        // SAFETY: with iovec_count > 0, SG_IO requires `dxferp` to point to
        // that many `sg_iovec`s.
        let iov = unsafe {
            std::slice::from_raw_parts(
                hdr.dxferp.cast::<SgIovec>().cast_const(),
                hdr.iovec_count as usize,
            )
        };
        iov.iter()
            .map(|v| (v.iov_base.cast::<u8>(), v.iov_len))
            .collect()
    };
    if all.iter().any(|&(p, n)| p.is_null() && n > 0) {
        return Err(libc::EFAULT);
    }
    Ok(all.into_iter().filter(|&(_, n)| n > 0).collect())
}

/// Run one PR command through reservd and fill `hdr` with the answer.
/// `Err` is the errno for the ioctl.
fn pr_command(fd: BorrowedFd<'_>, hdr: &mut SgIoHdr, cdb: &[u8]) -> Result<(), c_int> {
    let started = Instant::now();
    let dxfer_len = hdr.dxfer_len as usize;
    let req = prepare(cdb, hdr.dxfer_direction, dxfer_len)?;
    let pr_in = cdb[0] == PERSISTENT_RESERVE_IN;
    let buf = pieces(hdr)?;
    let params = if req.params_len > 0 {
        let slices: Vec<&[u8]> = buf
            .iter()
            // SAFETY: each piece is caller memory of that length (SG_IO's
            // contract for a transfer to the device), only read here.
            .map(|&(p, n)| unsafe { std::slice::from_raw_parts(p.cast_const(), n) })
            .collect();
        gather(&slices, req.params_len)
    } else {
        Vec::new()
    };
    let resp = route::execute(fd, &req, &params).map_err(|e| {
        eprintln!("reservd-prshim: {e}");
        libc::EIO
    })?;
    let c = complete(&resp, pr_in, dxfer_len, hdr.mx_sb_len);
    if c.data_len > 0 {
        let mut slices: Vec<&mut [u8]> = buf
            .iter()
            // SAFETY: each piece is caller memory of that length, given for
            // the device's data (SG_DXFER_FROM_DEV, checked by `prepare`);
            // the pieces do not overlap, as the kernel also assumes.
            .map(|&(p, n)| unsafe { std::slice::from_raw_parts_mut(p, n) })
            .collect();
        scatter(&resp.data[..c.data_len], &mut slices);
    }
    hdr.sb_len_wr = 0;
    if c.sense_len > 0 && !hdr.sbp.is_null() {
        // SAFETY: `sbp` points to `mx_sb_len` bytes for the sense, and
        // `sense_len` is at most `mx_sb_len`.
        let sbp = unsafe { std::slice::from_raw_parts_mut(hdr.sbp, c.sense_len as usize) };
        sbp.copy_from_slice(&resp.sense[..c.sense_len as usize]);
        hdr.sb_len_wr = c.sense_len;
    }
    hdr.status = c.status;
    hdr.masked_status = c.masked_status;
    hdr.msg_status = 0;
    hdr.host_status = c.host_status;
    hdr.driver_status = c.driver_status;
    hdr.resid = c.resid;
    hdr.info = c.info;
    hdr.duration = u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX);
    Ok(())
}
