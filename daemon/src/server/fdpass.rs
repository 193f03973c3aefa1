//! Receiving bytes with SCM_RIGHTS file descriptors (every received
//! descriptor is owned from the moment it arrives), and sending answers.
#![allow(unsafe_code)]

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

/// Room for as many fds as one message can carry (the kernel's
/// SCM_MAX_FD), so that the control data is never truncated. A truncated
/// SCM_RIGHTS message would still have installed the fds that fit, and nix
/// refuses to iterate over truncated control data: they would leak. A
/// stream recvmsg returns the fds of at most one sendmsg.
const MAX_FDS: usize = 253;

/// The result of one `recvmsg`.
pub struct Received {
    /// Bytes read; 0 means end of stream.
    pub len: usize,
    pub fds: Vec<OwnedFd>,
    /// Control data was truncated or was not SCM_RIGHTS.
    pub bad_control: bool,
}

/// Read at most `buf.len()` bytes and any fds sent with them.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    recv(sock, buf, MsgFlags::empty())
}

/// Like [`recv_with_fds`], but the bytes stay in the socket (MSG_PEEK); the
/// fds sent with them are received all the same (as new descriptors for the
/// same open files, owned here). A later read of the bytes without room for
/// control data makes the kernel drop its own references to those files.
pub fn peek_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    recv(sock, buf, MsgFlags::MSG_PEEK)
}

/// Read and drop `n` bytes (at most a CDB's 16) that a
/// [`peek_with_fds`] returned: they are in the socket already. The read has
/// no room for control data, so the kernel drops its own references to the
/// fds that came with them and installs none here.
pub fn discard_peeked(sock: BorrowedFd<'_>, n: usize) -> io::Result<()> {
    let mut buf = [0u8; reservd_proto::wire::CDB_SIZE];
    let mut got = 0;
    while got < n {
        match nix::sys::socket::recv(sock.as_raw_fd(), &mut buf[got..n], MsgFlags::empty()) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(k) => got += k,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn recv(sock: BorrowedFd<'_>, buf: &mut [u8], flags: MsgFlags) -> io::Result<Received> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC | flags,
    )
    .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    let mut bad_control = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
        match cmsg {
            ControlMessageOwned::ScmRights(raw) => {
                for fd in raw {
                    // SAFETY: the kernel has just installed `fd` in this
                    // process for us (SCM_RIGHTS); nothing else refers to
                    // it, so this OwnedFd is its only owner.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
            _ => bad_control = true,
        }
    }
    Ok(Received {
        len: msg.bytes,
        fds,
        bad_control,
    })
}

/// Send `data` (an answer: the server never sends fds); a closed peer is
/// an error (EPIPE), not a SIGPIPE.
pub fn send(sock: BorrowedFd<'_>, data: &[u8]) -> io::Result<usize> {
    nix::sys::socket::send(sock.as_raw_fd(), data, MsgFlags::MSG_NOSIGNAL).map_err(io::Error::from)
}
