//! Backends execute one PR command on one file descriptor.
//!
//! A backend answers every SCSI-level outcome with an [`Answer`] (status and
//! sense); `Err` is reserved for failures that leave nothing to answer, and
//! closes the client's connection.

use std::fmt;
use std::os::fd::BorrowedFd;

use reservd_proto::cdb::PERSISTENT_RESERVE_OUT;
use reservd_proto::sense::{Answer, SenseCode};
use reservd_proto::wire::OP_CLEANUP;

pub mod dm;
pub mod multipath;
pub mod router;
pub mod sgio;

/// Identifies the client connection a command came on. The emulated target
/// treats each one as an I_T nexus.
pub type Nexus = u64;

/// The credentials of a client process, as the kernel reported them when
/// it connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} uid {} gid {}", self.pid, self.uid, self.gid)
    }
}

/// One command as a backend sees it.
pub struct Command<'a> {
    pub nexus: Nexus,
    /// Who sent it (SO_PEERCRED at accept), when known.
    pub peer: Option<Peer>,
    pub fd: BorrowedFd<'a>,
    pub cdb: &'a [u8; 16],
    pub params: &'a [u8],
}

/// A failure that leaves no SCSI answer to give: the connection is closed.
#[derive(Debug)]
pub enum BackendError {
    /// A helper service (multipathd) could not be reached.
    Service(String),
    /// The file descriptor cannot be used at all.
    BadFd(std::io::Error),
    /// The command panicked (a bug in reservd, e.g. on data no test
    /// foresaw); the panic was contained to its connection.
    Panicked(String),
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendError::Service(s) => write!(f, "{s}"),
            BackendError::BadFd(e) => write!(f, "unusable file descriptor: {e}"),
            BackendError::Panicked(m) => write!(f, "the command panicked (a bug in reservd): {m}"),
        }
    }
}

impl std::error::Error for BackendError {}

/// Which backend ran a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// SG_IO on the client's fd.
    SgIo,
    /// The multipath side: libmpathpersist and the map's paths.
    Multipath,
}

impl BackendKind {
    /// The name the audit trail and the metrics give it.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::SgIo => "sgio",
            BackendKind::Multipath => "multipath",
        }
    }
}

pub trait PrBackend: Send + Sync {
    /// Execute `cmd` (opcode 0x5E, 0x5F, or 0xFF when CLEANUP is enabled).
    fn execute(&self, cmd: &Command<'_>) -> Result<Answer, BackendError>;

    /// The client connection `nexus` has gone away.
    fn disconnect(&self, _nexus: Nexus) {}
}

/// Whether `fd` was opened read-only.
pub fn is_read_only(fd: BorrowedFd<'_>) -> bool {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    match fcntl(fd, FcntlArg::F_GETFL) {
        Ok(flags) => OFlag::from_bits_truncate(flags) & OFlag::O_ACCMODE == OFlag::O_RDONLY,
        Err(_) => false,
    }
}

/// Run `cmd` on `backend` with the checks every backend shares: a PR OUT
/// (or CLEANUP) on a read-only fd is INVALID OPERATION CODE, as upstream.
pub fn execute(backend: &dyn PrBackend, cmd: &Command<'_>) -> Result<Answer, BackendError> {
    let op = cmd.cdb[0];
    if (op == PERSISTENT_RESERVE_OUT || op == OP_CLEANUP) && is_read_only(cmd.fd) {
        return Ok(Answer::check(SenseCode::INVALID_OPCODE));
    }
    backend.execute(cmd)
}
