//! A blocking client of the helper protocol, doing what QEMU's
//! pr-manager-helper does. Used by reservd's tools, tests and benchmarks.

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use reservd_proto::cdb::{pad16, transfer_length, PERSISTENT_RESERVE_IN};
use reservd_proto::sense::Answer;
use reservd_proto::wire::{decode_response_header, DATA_SIZE, RESPONSE_HEADER_SIZE};

/// A connection to reservd (or any qemu-pr-helper) after its handshake.
pub struct Client {
    stream: UnixStream,
    /// Features the server offered.
    pub server_features: u32,
}

impl Client {
    /// Connect and negotiate no features, as released QEMU does.
    pub fn connect(path: &Path) -> io::Result<Client> {
        Client::handshake(UnixStream::connect(path)?, 0)
    }

    /// Read the server's feature bytes, then request those of `wanted` it
    /// offers (asking for more would make it close the connection).
    pub fn negotiate(stream: UnixStream, wanted: u32) -> io::Result<Client> {
        Client::handshake_with(stream, |offered| wanted & offered)
    }

    /// Read the server's feature bytes, then request `requested`.
    pub fn handshake(stream: UnixStream, requested: u32) -> io::Result<Client> {
        Client::handshake_with(stream, |_| requested)
    }

    /// Read the server's feature bytes, then request what `request` makes
    /// of them.
    fn handshake_with(
        mut stream: UnixStream,
        request: impl FnOnce(u32) -> u32,
    ) -> io::Result<Client> {
        let mut f = [0u8; 4];
        stream.read_exact(&mut f)?;
        let offered = u32::from_be_bytes(f);
        stream.write_all(&request(offered).to_be_bytes())?;
        Ok(Client {
            stream,
            server_features: offered,
        })
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Send `cdb` (padded to 16 bytes) with `fd`, then `params`, and read
    /// the answer. Refuses (InvalidData) an answer larger than the CDB's
    /// allocation length, which would make QEMU abort.
    pub fn execute(&mut self, cdb: &[u8], fd: BorrowedFd<'_>, params: &[u8]) -> io::Result<Answer> {
        let cdb = pad16(cdb);
        let mut sent = 0;
        while sent < cdb.len() {
            let fds = if sent == 0 { vec![fd] } else { vec![] };
            sent += send_with_fds(self.stream.as_fd(), &cdb[sent..], &fds)?;
        }
        self.stream.write_all(params)?;
        let mut hdr = [0u8; RESPONSE_HEADER_SIZE];
        self.stream.read_exact(&mut hdr)?;
        let (mut answer, len) = decode_response_header(&hdr);
        let max = if cdb[0] == PERSISTENT_RESERVE_IN {
            transfer_length(&cdb).min(DATA_SIZE)
        } else {
            0
        };
        if len > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("answer of {len} bytes for an allocation length of {max}"),
            ));
        }
        answer.data = vec![0u8; len];
        self.stream.read_exact(&mut answer.data)?;
        Ok(answer)
    }
}

/// Send `data`, attaching `fds` (if any) to it, as one `sendmsg` with
/// SCM_RIGHTS; the number of bytes sent. A closed peer is an error
/// (EPIPE), not a SIGPIPE.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(data)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io::Error::from)
}
