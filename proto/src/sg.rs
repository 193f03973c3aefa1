//! Linux's SG_IO interface as `<scsi/sg.h>` defines it: the ioctl request
//! numbers and `struct sg_io_hdr`. Declarations only: the daemon's SG_IO
//! backend issues the ioctl, its seccomp filter lets these requests
//! through, and the test preload library (prshim) interposes on them.

use core::ffi::c_void;

/// `SG_IO`, the ioctl request number.
pub const SG_IO: u64 = 0x2285;
/// `SG_GET_VERSION_NUM`: sg3_utils-style callers (libmultipath's path
/// checks) ask the sg driver's version first.
pub const SG_GET_VERSION_NUM: u64 = 0x2282;

/// `SG_DXFER_NONE`: no data.
pub const SG_DXFER_NONE: i32 = -1;
/// `SG_DXFER_TO_DEV`: data goes to the device (PR OUT's parameter list).
pub const SG_DXFER_TO_DEV: i32 = -2;
/// `SG_DXFER_FROM_DEV`: data comes from the device (PR IN's answer).
pub const SG_DXFER_FROM_DEV: i32 = -3;
/// `SG_ERR_DRIVER_TIMEOUT` in `driver_status`, used as a mask the way QEMU
/// does.
pub const DRIVER_TIMEOUT_MASK: u16 = 0x06;

/// `DID_NO_CONNECT` in `host_status`: the SCSI midlayer did not send the
/// command, the device being offline or gone.
pub const DID_NO_CONNECT: u16 = 0x01;

/// `struct sg_io_hdr` (interface id 'S').
#[repr(C)]
#[derive(Debug)]
pub struct SgIoHdr {
    pub interface_id: i32,
    pub dxfer_direction: i32,
    pub cmd_len: u8,
    pub mx_sb_len: u8,
    /// 0: `dxferp` is the buffer; otherwise the number of `sg_iovec`s
    /// that `dxferp` points to.
    pub iovec_count: u16,
    pub dxfer_len: u32,
    pub dxferp: *mut c_void,
    pub cmdp: *const u8,
    pub sbp: *mut u8,
    pub timeout: u32,
    pub flags: u32,
    pub pack_id: i32,
    pub usr_ptr: *mut c_void,
    pub status: u8,
    pub masked_status: u8,
    pub msg_status: u8,
    pub sb_len_wr: u8,
    pub host_status: u16,
    pub driver_status: u16,
    pub resid: i32,
    pub duration: u32,
    pub info: u32,
}

/// `struct sg_iovec`: one piece of a scattered data buffer.
#[repr(C)]
#[derive(Debug)]
pub struct SgIovec {
    pub iov_base: *mut c_void,
    pub iov_len: usize,
}

#[cfg(test)]
#[cfg(target_arch = "x86_64")]
mod tests {
    use super::*;

    #[test]
    fn layout_is_the_kernels() {
        // offsetof() and sizeof() of <scsi/sg.h>'s sg_io_hdr_t on x86_64
        assert_eq!(std::mem::size_of::<SgIoHdr>(), 88);
        assert_eq!(std::mem::offset_of!(SgIoHdr, dxferp), 16);
        assert_eq!(std::mem::offset_of!(SgIoHdr, usr_ptr), 56);
        assert_eq!(std::mem::offset_of!(SgIoHdr, status), 64);
        assert_eq!(std::mem::offset_of!(SgIoHdr, resid), 72);
        assert_eq!(std::mem::offset_of!(SgIoHdr, info), 80);
        assert_eq!(std::mem::size_of::<SgIovec>(), 16);
    }
}
