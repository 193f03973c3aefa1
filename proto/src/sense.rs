//! SCSI status codes and sense data.
//!
//! Every SCSI-level failure reservd reports is an [`Answer`]: a status byte
//! plus, for CHECK CONDITION, sense data. Sense that reservd makes up itself
//! is 18 bytes of fixed-format sense (SPC-4 4.5.3), zero-filled to the
//! 96 bytes of the wire format; sense returned by a device is copied as is.
#![forbid(unsafe_code)]

/// Size of the sense area in every response.
pub const SENSE_SIZE: usize = 96;

/// SCSI status byte (SAM-5 5.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Status(pub u8);

impl Status {
    pub const GOOD: Status = Status(0x00);
    pub const CHECK_CONDITION: Status = Status(0x02);
    pub const BUSY: Status = Status(0x08);
    pub const RESERVATION_CONFLICT: Status = Status(0x18);
    pub const TASK_SET_FULL: Status = Status(0x28);

    /// The status's name in SAM-5, or "other".
    pub fn name(self) -> &'static str {
        match self {
            Status::GOOD => "GOOD",
            Status::CHECK_CONDITION => "CHECK CONDITION",
            Status::BUSY => "BUSY",
            Status::RESERVATION_CONFLICT => "RESERVATION CONFLICT",
            Status::TASK_SET_FULL => "TASK SET FULL",
            _ => "other",
        }
    }
}

/// A sense key with its additional sense code and qualifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SenseCode {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

const fn code(key: u8, asc: u8, ascq: u8) -> SenseCode {
    SenseCode { key, asc, ascq }
}

impl SenseCode {
    pub const NO_SENSE: SenseCode = code(0x00, 0x00, 0x00);
    pub const NOT_READY: SenseCode = code(0x02, 0x04, 0x00);
    pub const NO_MEDIUM: SenseCode = code(0x02, 0x3a, 0x00);
    pub const READ_ERROR: SenseCode = code(0x03, 0x11, 0x00);
    pub const TARGET_FAILURE: SenseCode = code(0x04, 0x44, 0x00);
    pub const INVALID_PARAM_LEN: SenseCode = code(0x05, 0x1a, 0x00);
    pub const INVALID_OPCODE: SenseCode = code(0x05, 0x20, 0x00);
    pub const INVALID_FIELD: SenseCode = code(0x05, 0x24, 0x00);
    pub const INVALID_PARAM: SenseCode = code(0x05, 0x26, 0x00);
    pub const INVALID_RELEASE: SenseCode = code(0x05, 0x26, 0x04);
    pub const INSUFFICIENT_REGISTRATION_RESOURCES: SenseCode = code(0x05, 0x55, 0x04);
    pub const RESET: SenseCode = code(0x06, 0x29, 0x00);
    pub const SCSI_BUS_RESET: SenseCode = code(0x06, 0x29, 0x02);
    pub const RESERVATIONS_PREEMPTED: SenseCode = code(0x06, 0x2a, 0x03);
    pub const RESERVATIONS_RELEASED: SenseCode = code(0x06, 0x2a, 0x04);
    pub const REGISTRATIONS_PREEMPTED: SenseCode = code(0x06, 0x2a, 0x05);
    pub const SPACE_ALLOC_FAILED: SenseCode = code(0x07, 0x27, 0x07);
    pub const IO_ERROR: SenseCode = code(0x0b, 0x00, 0x06);
    pub const LUN_NOT_RESPONDING: SenseCode = code(0x0b, 0x05, 0x00);
    pub const LUN_COMM_FAILURE: SenseCode = code(0x0b, 0x08, 0x00);
    pub const I_T_NEXUS_LOSS: SenseCode = code(0x0b, 0x29, 0x07);
    pub const COMMAND_TIMEOUT: SenseCode = code(0x0b, 0x2e, 0x02);
    pub const COMMAND_ABORTED: SenseCode = code(0x0b, 0x2f, 0x02);

    /// 18 bytes of fixed-format sense, current error, as QEMU builds it.
    pub fn fixed(self) -> [u8; 18] {
        let mut s = [0u8; 18];
        s[0] = 0x70;
        s[2] = self.key;
        s[7] = 10;
        s[12] = self.asc;
        s[13] = self.ascq;
        s
    }

    /// Decode the key/ASC/ASCQ of fixed (0x70/0x71) or descriptor
    /// (0x72/0x73) format sense. `None` for anything else.
    pub fn parse(sense: &[u8]) -> Option<SenseCode> {
        match sense.first()? & 0x7f {
            0x70 | 0x71 if sense.len() >= 14 => Some(code(sense[2] & 0x0f, sense[12], sense[13])),
            0x72 | 0x73 if sense.len() >= 4 => Some(code(sense[1] & 0x0f, sense[2], sense[3])),
            _ => None,
        }
    }
}

/// The SCSI answer to one command: what goes into the response header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: Status,
    /// The sense area, always 96 bytes; all zero unless CHECK CONDITION.
    pub sense: [u8; SENSE_SIZE],
    /// PR IN data. Only sent for PR IN with GOOD status.
    pub data: Vec<u8>,
}

impl Answer {
    pub fn good(data: Vec<u8>) -> Answer {
        Answer {
            status: Status::GOOD,
            sense: [0; SENSE_SIZE],
            data,
        }
    }

    /// A status without sense data (GOOD, BUSY, RESERVATION CONFLICT, ...).
    pub fn status(status: Status) -> Answer {
        Answer {
            status,
            sense: [0; SENSE_SIZE],
            data: Vec::new(),
        }
    }

    /// CHECK CONDITION with sense made up by reservd.
    pub fn check(code: SenseCode) -> Answer {
        let mut sense = [0u8; SENSE_SIZE];
        sense[..18].copy_from_slice(&code.fixed());
        Answer {
            status: Status::CHECK_CONDITION,
            sense,
            data: Vec::new(),
        }
    }

    /// A status with sense bytes returned by a device (truncated to 96).
    pub fn with_device_sense(status: Status, device_sense: &[u8]) -> Answer {
        let mut sense = [0u8; SENSE_SIZE];
        let n = device_sense.len().min(SENSE_SIZE);
        sense[..n].copy_from_slice(&device_sense[..n]);
        Answer {
            status,
            sense,
            data: Vec::new(),
        }
    }

    /// The sense code of a CHECK CONDITION answer, if its sense decodes.
    pub fn sense_code(&self) -> Option<SenseCode> {
        if self.status == Status::CHECK_CONDITION {
            SenseCode::parse(&self.sense)
        } else {
            None
        }
    }
}

/// Why a command failed below the SCSI layer. [`failure_answer`] is the one
/// place that turns these into SCSI answers (libmpathpersist's return
/// codes: [`crate::mpath::answer`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// A system call failed with this errno (SG_IO itself, or opening a path).
    Errno(i32),
    /// The SCSI midlayer reported this host status (DID_*).
    HostStatus(u16),
    /// The SCSI midlayer's driver status flagged a timeout.
    DriverTimeout,
}

/// Map a failure below the SCSI layer to the answer the guest sees.
///
/// The errno and host-status tables are QEMU's (`scsi/utils.c`), so a guest
/// sees what `qemu-pr-helper` would have told it; the one deliberate
/// difference is that host statuses QEMU does not know are reported as
/// LUN COMMUNICATION FAILURE instead of GOOD.
pub fn failure_answer(failure: Failure) -> Answer {
    match failure {
        Failure::Errno(errno) => match errno {
            0 => Answer::status(Status::GOOD),
            libc_errno::EDOM => Answer::status(Status::TASK_SET_FULL),
            libc_errno::EBADE => Answer::status(Status::RESERVATION_CONFLICT),
            libc_errno::ENODATA => Answer::check(SenseCode::READ_ERROR),
            libc_errno::EREMOTEIO => Answer::check(SenseCode::TARGET_FAILURE),
            libc_errno::ENOMEDIUM => Answer::check(SenseCode::NO_MEDIUM),
            libc_errno::ENOMEM => Answer::check(SenseCode::TARGET_FAILURE),
            libc_errno::EINVAL => Answer::check(SenseCode::INVALID_FIELD),
            libc_errno::ENOSPC => Answer::check(SenseCode::SPACE_ALLOC_FAILED),
            _ => Answer::check(SenseCode::IO_ERROR),
        },
        Failure::HostStatus(host) => match host {
            0x01 => Answer::check(SenseCode::LUN_NOT_RESPONDING),
            0x02 => Answer::status(Status::BUSY),
            0x03 => Answer::check(SenseCode::COMMAND_TIMEOUT),
            0x04 => Answer::check(SenseCode::LUN_COMM_FAILURE),
            0x05 => Answer::check(SenseCode::COMMAND_ABORTED),
            0x08 => Answer::check(SenseCode::RESET),
            0x0e => Answer::check(SenseCode::I_T_NEXUS_LOSS),
            0x10 => Answer::check(SenseCode::TARGET_FAILURE),
            0x11 => Answer::status(Status::RESERVATION_CONFLICT),
            0x12 => Answer::check(SenseCode::SPACE_ALLOC_FAILED),
            0x13 => Answer::check(SenseCode::READ_ERROR),
            _ => Answer::check(SenseCode::LUN_COMM_FAILURE),
        },
        Failure::DriverTimeout => Answer::status(Status::BUSY),
    }
}

/// Linux errno values used by the mapping (x86_64/aarch64 generic values),
/// kept here so this module stays free of libc.
pub mod libc_errno {
    pub const EINVAL: i32 = 22;
    pub const ENOMEM: i32 = 12;
    pub const ENOSPC: i32 = 28;
    pub const EDOM: i32 = 33;
    pub const EBADE: i32 = 52;
    pub const ENODATA: i32 = 61;
    pub const ENOTTY: i32 = 25;
    pub const EREMOTEIO: i32 = 121;
    pub const ENOMEDIUM: i32 = 123;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_sense_matches_qemu_layout() {
        // Bytes seen from qemu-pr-helper for a PR OUT on a read-only fd.
        let s = SenseCode::INVALID_OPCODE.fixed();
        assert_eq!(
            s,
            [0x70, 0, 0x05, 0, 0, 0, 0, 0x0a, 0, 0, 0, 0, 0x20, 0x00, 0, 0, 0, 0]
        );
    }

    #[test]
    fn check_answer_zero_fills_beyond_18_bytes() {
        let a = Answer::check(SenseCode::IO_ERROR);
        assert_eq!(a.status, Status::CHECK_CONDITION);
        assert_eq!(
            &a.sense[..14],
            &[0x70, 0, 0x0b, 0, 0, 0, 0, 0x0a, 0, 0, 0, 0, 0x00, 0x06]
        );
        assert!(a.sense[18..].iter().all(|&b| b == 0));
        assert_eq!(a.sense_code(), Some(SenseCode::IO_ERROR));
    }

    #[test]
    fn parse_descriptor_sense() {
        let d = [0x72, 0x06, 0x2a, 0x03, 0, 0, 0, 0];
        assert_eq!(
            SenseCode::parse(&d),
            Some(SenseCode::RESERVATIONS_PREEMPTED)
        );
        assert_eq!(SenseCode::parse(&[0x00; 18]), None);
        assert_eq!(SenseCode::parse(&[0x70, 0, 5]), None);
    }

    #[test]
    fn errno_table_is_qemus() {
        assert_eq!(
            failure_answer(Failure::Errno(libc_errno::ENOTTY)),
            Answer::check(SenseCode::IO_ERROR)
        );
        assert_eq!(
            failure_answer(Failure::Errno(libc_errno::EBADE)).status,
            Status::RESERVATION_CONFLICT
        );
        assert_eq!(
            failure_answer(Failure::Errno(libc_errno::EDOM)).status,
            Status::TASK_SET_FULL
        );
        assert_eq!(
            failure_answer(Failure::Errno(libc_errno::EINVAL)),
            Answer::check(SenseCode::INVALID_FIELD)
        );
        assert_eq!(
            failure_answer(Failure::Errno(libc_errno::ENOSPC)),
            Answer::check(SenseCode::SPACE_ALLOC_FAILED)
        );
    }

    #[test]
    fn host_status_table() {
        assert_eq!(
            failure_answer(Failure::HostStatus(3)),
            Answer::check(SenseCode::COMMAND_TIMEOUT)
        );
        assert_eq!(failure_answer(Failure::HostStatus(2)).status, Status::BUSY);
        assert_eq!(
            failure_answer(Failure::HostStatus(0x11)).status,
            Status::RESERVATION_CONFLICT
        );
        // Unknown host statuses are failures, not GOOD.
        assert_eq!(
            failure_answer(Failure::HostStatus(7)),
            Answer::check(SenseCode::LUN_COMM_FAILURE)
        );
        assert_eq!(failure_answer(Failure::DriverTimeout).status, Status::BUSY);
    }
}
