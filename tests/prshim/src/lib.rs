//! An `LD_PRELOAD` library for tests: every PERSISTENT RESERVE IN/OUT a
//! program sends with `ioctl(fd, SG_IO, hdr)` goes to reservd over the
//! helper protocol instead of to the device, the way QEMU sends a guest's
//! commands; every other ioctl (INQUIRY, TEST UNIT READY, READ, WRITE, ...
//! through SG_IO, and everything else) goes to the C library's `ioctl`.
//!
//! ```sh
//! RESERVD_PRSHIM_SOCKET=/run/reservd.sock \
//! LD_PRELOAD=target/debug/libreservd_prshim.so \
//!     iscsi-test-cu --test='SCSI.Prout*' /dev/mapper/mpatha
//! ```
//!
//! For each such command the library connects to the socket named by
//! `RESERVD_PRSHIM_SOCKET` (once per process, with the handshake), sends
//! the CDB with the caller's fd and the PR OUT parameter list
//! ([`reservd_client::client`]), and fills the caller's `sg_io_hdr` with
//! reservd's answer as the kernel fills it after a command
//! ([`translate::complete`]). `RESERVD_PRSHIM_TRACE=FILE` appends one line
//! per command routed (CDB, answer) to FILE.
//!
//! Failures of the library itself (no socket variable, reservd not
//! reachable, the connection lost) make the ioctl fail with EIO and say why
//! on stderr: an answer is always reservd's.
//!
//! `unsafe` lives in the `ffi` module, the exported `ioctl` and the accesses to the
//! caller's memory that the sg_io_hdr points to.

pub mod route;
pub mod translate;

// Not in the unit tests' binary, whose own ioctl calls it would take.
#[cfg(all(not(test), target_os = "linux", target_arch = "x86_64"))]
#[allow(unsafe_code)]
mod ffi;
