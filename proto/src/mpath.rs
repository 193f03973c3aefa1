//! libmpathpersist's return codes (`MPATH_PR_*` in `mpath_persist.h`), and
//! what reservd answers for each. The FFI wrapper checks at compile time
//! that the header it was built with agrees.

use crate::sense::{Answer, SenseCode, Status};

pub const SKIP: i32 = -1;
pub const SUCCESS: i32 = 0;
pub const SYNTAX_ERROR: i32 = 1;
pub const SENSE_NOT_READY: i32 = 2;
pub const SENSE_MEDIUM_ERROR: i32 = 3;
pub const SENSE_HARDWARE_ERROR: i32 = 4;
pub const ILLEGAL_REQ: i32 = 5;
pub const SENSE_UNIT_ATTENTION: i32 = 6;
pub const SENSE_INVALID_OP: i32 = 7;
pub const SENSE_ABORTED_COMMAND: i32 = 8;
pub const NO_SENSE: i32 = 9;
pub const SENSE_MALFORMED: i32 = 10;
pub const RESERV_CONFLICT: i32 = 11;
pub const FILE_ERROR: i32 = 12;
pub const DMMP_ERROR: i32 = 13;
pub const THREAD_ERROR: i32 = 14;
pub const OTHER: i32 = 15;
/// From multipath-tools 0.12, "internal only".
pub const RETRYABLE_ERROR: i32 = 16;
/// From multipath-tools 0.13, "internal only".
pub const SUCCESS_UNREGISTER: i32 = 17;

/// The codes [`name`] knows, from [`SKIP`] to [`SUCCESS_UNREGISTER`].
pub const CODES: std::ops::RangeInclusive<i32> = SKIP..=SUCCESS_UNREGISTER;

/// A return code's name without its `MPATH_PR_` prefix (`DMMP_ERROR`), or
/// `UNKNOWN` (0.9.4 returns -1 when SG_IO fails: `SKIP`'s value).
pub fn name(code: i32) -> &'static str {
    match code {
        SKIP => "SKIP",
        SUCCESS => "SUCCESS",
        SYNTAX_ERROR => "SYNTAX_ERROR",
        SENSE_NOT_READY => "SENSE_NOT_READY",
        SENSE_MEDIUM_ERROR => "SENSE_MEDIUM_ERROR",
        SENSE_HARDWARE_ERROR => "SENSE_HARDWARE_ERROR",
        ILLEGAL_REQ => "ILLEGAL_REQ",
        SENSE_UNIT_ATTENTION => "SENSE_UNIT_ATTENTION",
        SENSE_INVALID_OP => "SENSE_INVALID_OP",
        SENSE_ABORTED_COMMAND => "SENSE_ABORTED_COMMAND",
        NO_SENSE => "NO_SENSE",
        SENSE_MALFORMED => "SENSE_MALFORMED",
        RESERV_CONFLICT => "RESERV_CONFLICT",
        FILE_ERROR => "FILE_ERROR",
        DMMP_ERROR => "DMMP_ERROR",
        THREAD_ERROR => "THREAD_ERROR",
        OTHER => "OTHER",
        RETRYABLE_ERROR => "RETRYABLE_ERROR",
        SUCCESS_UNREGISTER => "SUCCESS_UNREGISTER",
        _ => "UNKNOWN",
    }
}

/// The answer the guest sees for a libmpathpersist return code:
/// qemu-pr-helper's table (`mpath_reconstruct_sense`), but for unknown
/// codes, which are failures.
pub fn answer(code: i32) -> Answer {
    match code {
        SUCCESS => Answer::status(Status::GOOD),
        SENSE_NOT_READY => Answer::check(SenseCode::NOT_READY),
        SENSE_MEDIUM_ERROR => Answer::check(SenseCode::READ_ERROR),
        SENSE_HARDWARE_ERROR => Answer::check(SenseCode::TARGET_FAILURE),
        SENSE_ABORTED_COMMAND => Answer::check(SenseCode::IO_ERROR),
        // The device's UNIT ATTENTION was consumed by the library's
        // retries: report a heavyweight one.
        SENSE_UNIT_ATTENTION => Answer::check(SenseCode::SCSI_BUS_RESET),
        SENSE_INVALID_OP => Answer::check(SenseCode::INVALID_OPCODE),
        // Any ILLEGAL REQUEST; the ASC is lost. reservd has already
        // checked the CDB, so the parameter list is the likelier culprit.
        ILLEGAL_REQ => Answer::check(SenseCode::INVALID_PARAM),
        NO_SENSE => Answer::check(SenseCode::NO_SENSE),
        RESERV_CONFLICT => Answer::status(Status::RESERVATION_CONFLICT),
        // SYNTAX_ERROR (reservation_key mismatch or missing), MALFORMED,
        // FILE_ERROR, DMMP_ERROR (no usable path, multipathd
        // unreachable), THREAD_ERROR, OTHER, the internal 16 and 17,
        // and raw negative values (0.9.4 returns -1 when SG_IO fails).
        _ => Answer::check(SenseCode::LUN_COMM_FAILURE),
    }
}

/// Whether a libmpathpersist failure hides sense data worth recovering:
/// for NOT READY, MEDIUM ERROR, HARDWARE ERROR and ABORTED COMMAND the
/// library keeps only the sense key. reservd then sends TEST UNIT READY
/// to the map, as qemu-pr-helper does, and answers with its status and
/// sense if it is not GOOD (a NOT READY's ASC/ASCQ, such as "ALUA state
/// transition", tells the guest whether to retry); otherwise with the
/// generic sense of [`answer`].
pub fn wants_tur(code: i32) -> bool {
    matches!(
        code,
        SENSE_NOT_READY | SENSE_MEDIUM_ERROR | SENSE_HARDWARE_ERROR | SENSE_ABORTED_COMMAND
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names() {
        assert_eq!(name(SUCCESS), "SUCCESS");
        assert_eq!(name(DMMP_ERROR), "DMMP_ERROR");
        assert_eq!(name(SKIP), "SKIP");
        assert_eq!(name(SUCCESS_UNREGISTER), "SUCCESS_UNREGISTER");
        assert_eq!(name(-22), "UNKNOWN");
        assert_eq!(name(18), "UNKNOWN");
        // Every code of the range has its own name.
        let mut names: Vec<&str> = CODES.map(name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), CODES.count());
        assert!(!names.contains(&"UNKNOWN"));
    }

    #[test]
    fn mpath_return_code_table() {
        let cases: &[(i32, Answer)] = &[
            (SUCCESS, Answer::status(Status::GOOD)),
            (SYNTAX_ERROR, Answer::check(SenseCode::LUN_COMM_FAILURE)),
            (SENSE_NOT_READY, Answer::check(SenseCode::NOT_READY)),
            (SENSE_MEDIUM_ERROR, Answer::check(SenseCode::READ_ERROR)),
            (
                SENSE_HARDWARE_ERROR,
                Answer::check(SenseCode::TARGET_FAILURE),
            ),
            (ILLEGAL_REQ, Answer::check(SenseCode::INVALID_PARAM)),
            (
                SENSE_UNIT_ATTENTION,
                Answer::check(SenseCode::SCSI_BUS_RESET),
            ),
            (SENSE_INVALID_OP, Answer::check(SenseCode::INVALID_OPCODE)),
            (SENSE_ABORTED_COMMAND, Answer::check(SenseCode::IO_ERROR)),
            (NO_SENSE, Answer::check(SenseCode::NO_SENSE)),
            (SENSE_MALFORMED, Answer::check(SenseCode::LUN_COMM_FAILURE)),
            (
                RESERV_CONFLICT,
                Answer::status(Status::RESERVATION_CONFLICT),
            ),
            (FILE_ERROR, Answer::check(SenseCode::LUN_COMM_FAILURE)),
            (DMMP_ERROR, Answer::check(SenseCode::LUN_COMM_FAILURE)),
            (THREAD_ERROR, Answer::check(SenseCode::LUN_COMM_FAILURE)),
            (OTHER, Answer::check(SenseCode::LUN_COMM_FAILURE)),
            (RETRYABLE_ERROR, Answer::check(SenseCode::LUN_COMM_FAILURE)),
            (
                SUCCESS_UNREGISTER,
                Answer::check(SenseCode::LUN_COMM_FAILURE),
            ),
            (SKIP, Answer::check(SenseCode::LUN_COMM_FAILURE)),
            (-22, Answer::check(SenseCode::LUN_COMM_FAILURE)),
            (1000, Answer::check(SenseCode::LUN_COMM_FAILURE)),
        ];
        for (code, want) in cases {
            assert_eq!(&answer(*code), want, "code {code}");
        }
        // Reservation conflicts carry no sense.
        assert!(answer(RESERV_CONFLICT).sense.iter().all(|&b| b == 0));
        let tur: Vec<i32> = (-1..=17).filter(|&c| wants_tur(c)).collect();
        assert_eq!(tur, vec![2, 3, 4, 8]);
    }
}
