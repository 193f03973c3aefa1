//! QEMU's pr-helper wire protocol, without I/O.
//!
//! The server speaks first with 4 big-endian feature bytes, then reads the
//! client's 4. Each request is a 16-byte CDB carrying exactly one file
//! descriptor (SCM_RIGHTS), followed for PERSISTENT RESERVE OUT by the
//! parameter list whose length is the BE16 at CDB bytes 7..8. Each response
//! is `BE32 status, BE32 size, 96 bytes of sense`, then `size` bytes of data.
//!
//! [`Decoder`] is fed exactly the bytes it asks for ([`Decoder::wanted`]),
//! with the number of fds that arrived alongside; reading no more than that
//! keeps each fd attached to the frame it was sent with. Every
//! [`ProtoError`] means "close this connection without an answer", as
//! qemu-pr-helper does.
#![forbid(unsafe_code)]

use std::fmt;

use crate::cdb::{transfer_length, PERSISTENT_RESERVE_IN, PERSISTENT_RESERVE_OUT};
use crate::sense::{Answer, Status, SENSE_SIZE};

pub const CDB_SIZE: usize = 16;
/// Largest PR OUT parameter list and largest PR IN payload.
pub const DATA_SIZE: usize = 8192;
/// `int32 result; int32 sz; uint8 sense[96]`.
pub const RESPONSE_HEADER_SIZE: usize = 8 + SENSE_SIZE;
pub const FEATURES_SIZE: usize = 4;

/// Feature bit of the proposed CLEANUP extension (opcode 0xFF).
pub const FEATURE_CLEANUP: u32 = 1 << 0;
/// Vendor opcode of the CLEANUP extension.
pub const OP_CLEANUP: u8 = 0xff;

/// Why a connection is closed. None of these gets an answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtoError {
    /// The client asked for feature bits the server does not offer.
    UnsupportedFeatures { requested: u32, supported: u32 },
    /// A CDB arrived without a file descriptor.
    MissingFd,
    /// More than one file descriptor arrived with one CDB.
    ExtraFds(usize),
    /// A file descriptor arrived with the handshake or the parameter list.
    FdOutsideCdb,
    /// The control message was truncated (too many fds, or not SCM_RIGHTS).
    TruncatedControl,
    /// The opcode is not PERSISTENT RESERVE IN/OUT (or an enabled extension).
    BadOpcode(u8),
    /// The CDB's transfer length is above 8192.
    TransferTooLarge(usize),
    /// The peer closed the connection in the middle of a frame.
    Truncated {
        phase: &'static str,
        got: usize,
        want: usize,
    },
    /// The peer closed the connection between requests.
    Closed,
    /// Bytes arrived while a request was being executed.
    Pipelined,
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::UnsupportedFeatures {
                requested,
                supported,
            } => write!(
                f,
                "client requested features {requested:#x}, only {supported:#x} supported"
            ),
            ProtoError::MissingFd => write!(f, "no file descriptor in request"),
            ProtoError::ExtraFds(n) => write!(f, "{n} file descriptors in one request"),
            ProtoError::FdOutsideCdb => write!(f, "file descriptor sent outside a CDB"),
            ProtoError::TruncatedControl => write!(f, "truncated control message"),
            ProtoError::BadOpcode(op) => write!(f, "invalid CDB opcode {op:#04x}"),
            ProtoError::TransferTooLarge(n) => {
                write!(f, "transfer length {n} above {DATA_SIZE}")
            }
            ProtoError::Truncated { phase, got, want } => {
                write!(
                    f,
                    "connection closed in {phase} after {got} of {want} bytes"
                )
            }
            ProtoError::Closed => write!(f, "connection closed by peer"),
            ProtoError::Pipelined => write!(f, "data sent while a request was in flight"),
        }
    }
}

impl std::error::Error for ProtoError {}

/// One decoded request. The fd is held by the transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub cdb: [u8; CDB_SIZE],
    pub params: Vec<u8>,
}

impl Request {
    pub fn opcode(&self) -> u8 {
        self.cdb[0]
    }

    /// The most PR IN data the client accepts: min(allocation length, 8192).
    pub fn max_response_len(&self) -> usize {
        if self.cdb[0] == PERSISTENT_RESERVE_IN {
            transfer_length(&self.cdb).min(DATA_SIZE)
        } else {
            0
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The handshake finished with these requested features.
    Negotiated(u32),
    /// A complete request; its fd was counted with the CDB.
    Request(Request),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Handshake,
    Cdb,
    Params,
    Busy,
}

/// Incremental decoder of one connection's client-to-server stream.
#[derive(Debug)]
pub struct Decoder {
    supported: u32,
    phase: Phase,
    head: [u8; CDB_SIZE],
    got: usize,
    fds: usize,
    params: Vec<u8>,
    need: usize,
}

impl Decoder {
    /// `supported` is the feature mask the server advertises.
    pub fn new(supported: u32) -> Decoder {
        Decoder {
            supported,
            phase: Phase::Handshake,
            head: [0; CDB_SIZE],
            got: 0,
            fds: 0,
            params: Vec::new(),
            need: 0,
        }
    }

    /// The 4 bytes the server sends first.
    pub fn server_hello(&self) -> [u8; FEATURES_SIZE] {
        self.supported.to_be_bytes()
    }

    /// How many bytes to read next. 0 while a request is in flight.
    pub fn wanted(&self) -> usize {
        match self.phase {
            Phase::Handshake => FEATURES_SIZE - self.got,
            Phase::Cdb => CDB_SIZE - self.got,
            Phase::Params => self.need - self.params.len(),
            Phase::Busy => 0,
        }
    }

    /// Whether a request is being executed (no reads until [`Decoder::complete`]).
    pub fn is_busy(&self) -> bool {
        self.phase == Phase::Busy
    }

    /// Whether the next bytes are the start of a request's CDB.
    pub fn at_cdb_start(&self) -> bool {
        self.phase == Phase::Cdb && self.got == 0
    }

    /// Whether the stream is between frames, where EOF is a clean close.
    pub fn at_boundary(&self) -> bool {
        match self.phase {
            Phase::Handshake | Phase::Cdb => self.got == 0,
            Phase::Params => false,
            Phase::Busy => true,
        }
    }

    /// Feed `bytes` (at most [`Decoder::wanted`]) that arrived with `fds`
    /// file descriptors.
    pub fn feed(&mut self, bytes: &[u8], fds: usize) -> Result<Option<Event>, ProtoError> {
        if bytes.len() > self.wanted() {
            return Err(ProtoError::Pipelined);
        }
        match self.phase {
            Phase::Busy => Err(ProtoError::Pipelined),
            Phase::Handshake => {
                if fds > 0 {
                    return Err(ProtoError::FdOutsideCdb);
                }
                self.head[self.got..self.got + bytes.len()].copy_from_slice(bytes);
                self.got += bytes.len();
                if self.got < FEATURES_SIZE {
                    return Ok(None);
                }
                let requested =
                    u32::from_be_bytes([self.head[0], self.head[1], self.head[2], self.head[3]]);
                if requested & !self.supported != 0 {
                    return Err(ProtoError::UnsupportedFeatures {
                        requested,
                        supported: self.supported,
                    });
                }
                self.phase = Phase::Cdb;
                self.got = 0;
                Ok(Some(Event::Negotiated(requested)))
            }
            Phase::Cdb => {
                self.fds += fds;
                if self.fds > 1 {
                    return Err(ProtoError::ExtraFds(self.fds));
                }
                self.head[self.got..self.got + bytes.len()].copy_from_slice(bytes);
                self.got += bytes.len();
                if self.got < CDB_SIZE {
                    return Ok(None);
                }
                self.check_cdb()?;
                let len = match self.head[0] {
                    PERSISTENT_RESERVE_OUT => transfer_length(&self.head),
                    _ => 0,
                };
                if len == 0 {
                    return Ok(Some(self.finish()));
                }
                self.need = len;
                self.params = Vec::with_capacity(len);
                self.phase = Phase::Params;
                Ok(None)
            }
            Phase::Params => {
                if fds > 0 {
                    return Err(ProtoError::FdOutsideCdb);
                }
                self.params.extend_from_slice(bytes);
                if self.params.len() < self.need {
                    return Ok(None);
                }
                Ok(Some(self.finish()))
            }
        }
    }

    /// Validation of a complete CDB, in qemu-pr-helper's order.
    fn check_cdb(&self) -> Result<(), ProtoError> {
        if self.fds == 0 {
            return Err(ProtoError::MissingFd);
        }
        match self.head[0] {
            PERSISTENT_RESERVE_IN | PERSISTENT_RESERVE_OUT => {
                let len = transfer_length(&self.head);
                if len > DATA_SIZE {
                    return Err(ProtoError::TransferTooLarge(len));
                }
                Ok(())
            }
            OP_CLEANUP if self.supported & FEATURE_CLEANUP != 0 => Ok(()),
            op => Err(ProtoError::BadOpcode(op)),
        }
    }

    fn finish(&mut self) -> Event {
        self.phase = Phase::Busy;
        self.got = 0;
        self.fds = 0;
        self.need = 0;
        Event::Request(Request {
            cdb: self.head,
            params: std::mem::take(&mut self.params),
        })
    }

    /// The response to the request in flight has been queued: read the next CDB.
    pub fn complete(&mut self) {
        debug_assert_eq!(self.phase, Phase::Busy);
        self.phase = Phase::Cdb;
    }

    /// The error for an end of stream in the current state.
    pub fn eof(&self) -> ProtoError {
        let (phase, want) = match self.phase {
            Phase::Handshake => ("handshake", FEATURES_SIZE),
            Phase::Cdb => ("CDB", CDB_SIZE),
            Phase::Params => ("parameter list", self.need),
            Phase::Busy => return ProtoError::Closed,
        };
        let got = if self.phase == Phase::Params {
            self.params.len()
        } else {
            self.got
        };
        if got == 0 && self.phase != Phase::Params {
            ProtoError::Closed
        } else {
            ProtoError::Truncated { phase, got, want }
        }
    }
}

/// Encode the response to `req`, applying the size rules QEMU's client
/// relies on: data only for PR IN with GOOD status, never more than the
/// allocation length or 8192 bytes.
pub fn encode_response(req: &Request, answer: &Answer) -> Vec<u8> {
    let len = if answer.status == Status::GOOD {
        answer.data.len().min(req.max_response_len())
    } else {
        0
    };
    let mut out = Vec::with_capacity(RESPONSE_HEADER_SIZE + len);
    out.extend_from_slice(&(answer.status.0 as i32).to_be_bytes());
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.extend_from_slice(&answer.sense);
    out.extend_from_slice(&answer.data[..len]);
    out
}

/// Decode a response header, for clients: the answer it carries (its
/// data still to be read) and the number of data bytes that follow. The
/// status is the low byte of the 32-bit field, as QEMU reads it.
pub fn decode_response_header(b: &[u8; RESPONSE_HEADER_SIZE]) -> (Answer, usize) {
    let mut sense = [0u8; SENSE_SIZE];
    sense.copy_from_slice(&b[8..]);
    let status = i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let len = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
    let answer = Answer {
        status: Status(status as u8),
        sense,
        data: Vec::new(),
    };
    (answer, len as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sense::SenseCode;

    fn ready(supported: u32) -> Decoder {
        let mut d = Decoder::new(supported);
        assert_eq!(d.server_hello(), supported.to_be_bytes());
        assert_eq!(d.wanted(), 4);
        assert_eq!(d.feed(&[0, 0, 0, 0], 0), Ok(Some(Event::Negotiated(0))));
        d
    }

    fn cdb(op: u8, len: u16) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = op;
        c[7..9].copy_from_slice(&len.to_be_bytes());
        c
    }

    #[test]
    fn handshake_rejects_unknown_bits() {
        let mut d = Decoder::new(0);
        assert_eq!(
            d.feed(&[0, 0, 0, 1], 0),
            Err(ProtoError::UnsupportedFeatures {
                requested: 1,
                supported: 0
            })
        );
        let mut d = Decoder::new(FEATURE_CLEANUP);
        assert_eq!(d.server_hello(), [0, 0, 0, 1]);
        assert_eq!(d.feed(&[0, 0, 0, 1], 0), Ok(Some(Event::Negotiated(1))));
        let mut d = Decoder::new(FEATURE_CLEANUP);
        assert!(d.feed(&[0x80, 0, 0, 0], 0).is_err());
    }

    #[test]
    fn handshake_in_pieces_and_fd_in_handshake() {
        let mut d = Decoder::new(0);
        assert_eq!(d.feed(&[0, 0], 0), Ok(None));
        assert_eq!(d.wanted(), 2);
        assert_eq!(d.feed(&[0, 0], 0), Ok(Some(Event::Negotiated(0))));
        let mut d = Decoder::new(0);
        assert_eq!(d.feed(&[0, 0, 0, 0], 1), Err(ProtoError::FdOutsideCdb));
    }

    #[test]
    fn cdb_start_is_only_at_the_first_byte_of_a_cdb() {
        let mut d = Decoder::new(0);
        assert!(!d.at_cdb_start(), "in the handshake");
        d.feed(&[0, 0, 0, 0], 0).unwrap();
        assert!(d.at_cdb_start());
        let c = cdb(0x5e, 8192);
        d.feed(&c[..5], 1).unwrap();
        assert!(!d.at_cdb_start(), "inside a CDB");
        d.feed(&c[5..], 0).unwrap();
        assert!(!d.at_cdb_start(), "while a request is in flight");
        d.complete();
        assert!(d.at_cdb_start());
        let c = cdb(0x5f, 24);
        d.feed(&c, 1).unwrap();
        assert!(!d.at_cdb_start(), "before a parameter list");
    }

    #[test]
    fn pr_in_request() {
        let mut d = ready(0);
        assert_eq!(d.wanted(), 16);
        let c = cdb(0x5e, 8192);
        let ev = d.feed(&c, 1).unwrap().unwrap();
        assert_eq!(
            ev,
            Event::Request(Request {
                cdb: c,
                params: vec![]
            })
        );
        assert!(d.is_busy());
        assert_eq!(d.wanted(), 0);
        assert_eq!(d.feed(&[0], 0), Err(ProtoError::Pipelined));
        d.complete();
        assert_eq!(d.wanted(), 16);
    }

    #[test]
    fn pr_out_request_with_params_in_pieces() {
        let mut d = ready(0);
        let c = cdb(0x5f, 24);
        assert_eq!(d.feed(&c[..3], 1), Ok(None));
        assert_eq!(d.feed(&c[3..], 0), Ok(None));
        assert_eq!(d.wanted(), 24);
        assert_eq!(d.feed(&[7; 10], 0), Ok(None));
        assert_eq!(d.wanted(), 14);
        let ev = d.feed(&[7; 14], 0).unwrap().unwrap();
        assert_eq!(
            ev,
            Event::Request(Request {
                cdb: c,
                params: vec![7; 24]
            })
        );
    }

    #[test]
    fn pr_out_with_zero_length_has_no_params() {
        let mut d = ready(0);
        let ev = d.feed(&cdb(0x5f, 0), 1).unwrap();
        assert!(matches!(ev, Some(Event::Request(r)) if r.params.is_empty()));
    }

    #[test]
    fn close_rules() {
        assert_eq!(ready(0).feed(&cdb(0x5e, 8), 0), Err(ProtoError::MissingFd));
        assert_eq!(
            ready(0).feed(&cdb(0x5e, 8), 2),
            Err(ProtoError::ExtraFds(2))
        );
        let mut d = ready(0);
        assert_eq!(d.feed(&cdb(0x5e, 8)[..8], 1), Ok(None));
        assert_eq!(d.feed(&cdb(0x5e, 8)[8..], 1), Err(ProtoError::ExtraFds(2)));
        assert_eq!(
            ready(0).feed(&cdb(0x12, 8), 1),
            Err(ProtoError::BadOpcode(0x12))
        );
        assert_eq!(
            ready(0).feed(&cdb(0x5e, 8193), 1),
            Err(ProtoError::TransferTooLarge(8193))
        );
        assert_eq!(
            ready(0).feed(&cdb(0x5f, 0xffff), 1),
            Err(ProtoError::TransferTooLarge(0xffff))
        );
        assert!(ready(0).feed(&cdb(0x5e, 8192), 1).unwrap().is_some());
        let mut d = ready(0);
        d.feed(&cdb(0x5f, 24), 1).unwrap();
        assert_eq!(d.feed(&[0; 24], 1), Err(ProtoError::FdOutsideCdb));
    }

    #[test]
    fn missing_fd_is_checked_before_opcode() {
        assert_eq!(ready(0).feed(&cdb(0x12, 8), 0), Err(ProtoError::MissingFd));
    }

    #[test]
    fn cleanup_opcode_only_when_enabled() {
        assert_eq!(
            ready(0).feed(&cdb(0xff, 0), 1),
            Err(ProtoError::BadOpcode(0xff))
        );
        let mut d = ready(FEATURE_CLEANUP);
        // CDB bytes after the opcode are ignored, including a length.
        let ev = d.feed(&cdb(0xff, 0xffff), 1).unwrap().unwrap();
        assert!(matches!(ev, Event::Request(r) if r.opcode() == 0xff && r.params.is_empty()));
    }

    #[test]
    fn eof_classification() {
        let d = Decoder::new(0);
        assert_eq!(d.eof(), ProtoError::Closed);
        let mut d = ready(0);
        assert_eq!(d.eof(), ProtoError::Closed);
        assert!(d.at_boundary());
        d.feed(&cdb(0x5f, 24)[..5], 1).unwrap();
        assert_eq!(
            d.eof(),
            ProtoError::Truncated {
                phase: "CDB",
                got: 5,
                want: 16
            }
        );
        d.feed(&cdb(0x5f, 24)[5..], 0).unwrap();
        assert_eq!(
            d.eof(),
            ProtoError::Truncated {
                phase: "parameter list",
                got: 0,
                want: 24
            }
        );
        assert!(!d.at_boundary());
    }

    #[test]
    fn response_sizes() {
        let req = |op: u8, len: u16| Request {
            cdb: cdb(op, len),
            params: vec![],
        };
        let good = Answer::good(vec![0xaa; 40]);
        // PR IN: truncated to the allocation length.
        let r = encode_response(&req(0x5e, 16), &good);
        assert_eq!(r.len(), 104 + 16);
        assert_eq!(&r[..8], &[0, 0, 0, 0, 0, 0, 0, 16]);
        // PR IN with allocation length 0: no data.
        assert_eq!(encode_response(&req(0x5e, 0), &good).len(), 104);
        // PR IN with a large allocation: all the data.
        assert_eq!(encode_response(&req(0x5e, 8192), &good).len(), 104 + 40);
        // PR OUT: never data.
        assert_eq!(encode_response(&req(0x5f, 24), &good).len(), 104);
        // Non-GOOD: never data.
        let mut bad = Answer::check(SenseCode::INVALID_FIELD);
        bad.data = vec![1; 40];
        let r = encode_response(&req(0x5e, 8192), &bad);
        assert_eq!(r.len(), 104);
        assert_eq!(&r[..8], &[0, 0, 0, 2, 0, 0, 0, 0]);
        assert_eq!(&r[8..26], &SenseCode::INVALID_FIELD.fixed());
        let (a, len) = decode_response_header(r[..104].try_into().unwrap());
        assert_eq!(a.status.0, 2);
        assert_eq!(len, 0);
        assert_eq!(a.sense_code(), Some(SenseCode::INVALID_FIELD));
    }
}
