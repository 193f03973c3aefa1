//! Raw frames of the helper protocol, for the tests that send what a
//! well-behaved client never would, or read an answer byte for byte: CDB and
//! parameter-list builders, connecting and the handshake, sending with fds
//! attached, and reading answers (or the close that replaces one).

use std::io::Write;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use reservd_client::client::send_with_fds;
use reservd_proto::cdb::{prin_sa, prout_sa};
use reservd_proto::sense::Answer;
use reservd_proto::wire::{decode_response_header, RESPONSE_HEADER_SIZE};

use crate::spawn::{wait_until, DEADLINE};

pub const PRIN: u8 = 0x5e;
pub const PROUT: u8 = 0x5f;

// ------------------------------------------------------------------ CDBs

/// A 16-byte CDB from its first bytes.
pub fn cdb(prefix: &[u8]) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[..prefix.len()].copy_from_slice(prefix);
    c
}

/// A PERSISTENT RESERVE IN CDB, padded to 16 bytes.
pub fn cdb_in(sa: u8, alloc: u16) -> [u8; 16] {
    let l = alloc.to_be_bytes();
    cdb(&[PRIN, sa, 0, 0, 0, 0, 0, l[0], l[1], 0])
}

/// A PERSISTENT RESERVE OUT CDB with a parameter list of `len` bytes.
pub fn cdb_out(sa: u8, scope_type: u8, len: u16) -> [u8; 16] {
    let l = u32::from(len).to_be_bytes();
    cdb(&[PROUT, sa, scope_type, 0, 0, l[0], l[1], l[2], l[3], 0])
}

/// PERSISTENT RESERVE IN, READ KEYS, with this allocation length.
pub fn read_keys(alloc: u16) -> [u8; 16] {
    cdb_in(prin_sa::READ_KEYS, alloc)
}

/// PERSISTENT RESERVE OUT, REGISTER, with this parameter list length.
pub fn register(len: u16) -> [u8; 16] {
    cdb_out(prout_sa::REGISTER, 0, len)
}

/// The basic 24-byte PR OUT parameter list.
pub fn params(key: u64, sa_key: u64, flags: u8) -> Vec<u8> {
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    p[20] = flags;
    p
}

/// A 24-byte REGISTER parameter list for `key`.
pub fn register_params(key: u64) -> Vec<u8> {
    params(0, key, 0)
}

// ----------------------------------------------------------- connecting

/// Connect to `path`, retrying while the listener is not up yet.
pub fn connect(path: &Path) -> UnixStream {
    let mut last = None;
    let ok = wait_until(DEADLINE, || match UnixStream::connect(path) {
        Ok(s) => {
            last = Some(Ok(s));
            true
        }
        Err(e) => {
            last = Some(Err(e));
            false
        }
    });
    match last {
        Some(Ok(s)) if ok => {
            s.set_read_timeout(Some(DEADLINE)).unwrap();
            s.set_write_timeout(Some(DEADLINE)).unwrap();
            s
        }
        other => panic!("cannot connect to {}: {other:?}", path.display()),
    }
}

/// Connect and complete the handshake with `requested` features.
/// Returns the stream and the server's feature bytes.
pub fn hello(path: &Path, requested: u32) -> (UnixStream, [u8; 4]) {
    let mut s = connect(path);
    let f = read_features(&mut s);
    s.write_all(&requested.to_be_bytes()).unwrap();
    (s, f)
}

// -------------------------------------------------------------- sending

/// Send all of `data`, the fds attached to its first byte.
pub fn send(s: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut sent = 0;
    while sent < data.len() {
        let attach: &[BorrowedFd<'_>] = if sent == 0 { fds } else { &[] };
        match send_with_fds(s.as_fd(), &data[sent..], attach) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// [`send`], where a peer that has already closed is not an error: the
/// outcome is read later.
pub fn send_frame(s: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    match send(s, bytes, fds) {
        Ok(()) => {}
        Err(e)
            if e.kind() == io::ErrorKind::BrokenPipe
                || e.kind() == io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("send failed: {e}"),
    }
}

// -------------------------------------------------------------- reading

/// Read exactly `n` bytes, or fewer if the peer closes first. A read
/// timeout panics: every exchange in these tests ends in data or a close.
pub fn read_up_to(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    let mut got = 0;
    while got < n {
        match s.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // The peer closed with bytes of ours unread.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("read failed after {got} of {n} bytes: {e}"),
        }
    }
    buf.truncate(got);
    buf
}

/// Read the server's 4 feature bytes.
pub fn read_features(s: &mut UnixStream) -> [u8; 4] {
    let b = read_up_to(s, 4);
    b.try_into()
        .unwrap_or_else(|b: Vec<u8>| panic!("handshake cut short: {b:02x?}"))
}

/// The server's features, as a number.
pub fn read_hello(s: &mut UnixStream) -> u32 {
    u32::from_be_bytes(read_features(s))
}

/// What the server did with one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The full answer: 104-byte header, then the payload.
    Answered(Vec<u8>),
    /// The connection was closed with nothing sent.
    Closed,
}

impl Reply {
    pub fn answer(&self) -> &[u8] {
        match self {
            Reply::Answered(b) => b,
            Reply::Closed => panic!("expected an answer, the connection was closed"),
        }
    }

    pub fn status(&self) -> u32 {
        u32::from_be_bytes(self.answer()[0..4].try_into().unwrap())
    }

    /// The answer's data length field.
    pub fn data_len(&self) -> u32 {
        u32::from_be_bytes(self.answer()[4..8].try_into().unwrap())
    }

    pub fn sense(&self) -> &[u8] {
        &self.answer()[8..RESPONSE_HEADER_SIZE]
    }

    /// (key, ASC, ASCQ) of fixed-format sense.
    pub fn sense_code(&self) -> (u8, u8, u8) {
        let s = self.sense();
        assert_eq!(s[0] & 0x7f, 0x70, "fixed-format sense expected: {s:02x?}");
        (s[2] & 0x0f, s[12], s[13])
    }
}

/// Read one answer, or observe the close. An answer cut short panics.
pub fn read_reply(s: &mut UnixStream) -> Reply {
    let hdr = read_up_to(s, RESPONSE_HEADER_SIZE);
    if hdr.is_empty() {
        return Reply::Closed;
    }
    assert_eq!(
        hdr.len(),
        RESPONSE_HEADER_SIZE,
        "answer header cut short: {hdr:02x?}"
    );
    let len = u32::from_be_bytes(hdr[4..8].try_into().unwrap()) as usize;
    assert!(len <= 8192, "answer length {len}");
    let data = read_up_to(s, len);
    assert_eq!(data.len(), len, "answer payload cut short");
    let mut all = hdr;
    all.extend(data);
    Reply::Answered(all)
}

/// Read one answer, or `None` if the server closed the connection before
/// sending a byte of one.
pub fn read_answer(s: &mut UnixStream) -> Option<Answer> {
    match read_reply(s) {
        Reply::Closed => None,
        Reply::Answered(b) => {
            let (mut answer, len) =
                decode_response_header(b[..RESPONSE_HEADER_SIZE].try_into().unwrap());
            answer.data = b[RESPONSE_HEADER_SIZE..].to_vec();
            assert_eq!(answer.data.len(), len);
            Some(answer)
        }
    }
}

/// The server closed the connection without answering.
#[track_caller]
pub fn assert_closed(s: &mut UnixStream) {
    if let Some(a) = read_answer(s) {
        panic!("expected the connection to be closed, got {a:?}");
    }
}
