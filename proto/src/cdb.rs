//! PERSISTENT RESERVE IN / OUT command descriptor blocks (SPC-4 6.15, 6.16).
#![forbid(unsafe_code)]

use crate::sense::SenseCode;

pub const PERSISTENT_RESERVE_IN: u8 = 0x5e;
pub const PERSISTENT_RESERVE_OUT: u8 = 0x5f;

/// PR IN service actions.
pub mod prin_sa {
    pub const READ_KEYS: u8 = 0x00;
    pub const READ_RESERVATION: u8 = 0x01;
    pub const REPORT_CAPABILITIES: u8 = 0x02;
    pub const READ_FULL_STATUS: u8 = 0x03;

    /// The service action's name, as reservd's metrics label it
    /// (`READ_KEYS`), or `UNKNOWN`.
    pub fn name(sa: u8) -> &'static str {
        match sa {
            READ_KEYS => "READ_KEYS",
            READ_RESERVATION => "READ_RESERVATION",
            REPORT_CAPABILITIES => "REPORT_CAPABILITIES",
            READ_FULL_STATUS => "READ_FULL_STATUS",
            _ => "UNKNOWN",
        }
    }
}

/// PR OUT service actions.
pub mod prout_sa {
    pub const REGISTER: u8 = 0x00;
    pub const RESERVE: u8 = 0x01;
    pub const RELEASE: u8 = 0x02;
    pub const CLEAR: u8 = 0x03;
    pub const PREEMPT: u8 = 0x04;
    pub const PREEMPT_AND_ABORT: u8 = 0x05;
    pub const REGISTER_AND_IGNORE: u8 = 0x06;
    pub const REGISTER_AND_MOVE: u8 = 0x07;
    pub const REPLACE_LOST_RESERVATION: u8 = 0x08;

    /// The service action's name, as the audit trail and the metrics
    /// give it (`REGISTER_AND_IGNORE`), or `UNKNOWN`.
    pub fn name(sa: u8) -> &'static str {
        match sa {
            REGISTER => "REGISTER",
            RESERVE => "RESERVE",
            RELEASE => "RELEASE",
            CLEAR => "CLEAR",
            PREEMPT => "PREEMPT",
            PREEMPT_AND_ABORT => "PREEMPT_AND_ABORT",
            REGISTER_AND_IGNORE => "REGISTER_AND_IGNORE",
            REGISTER_AND_MOVE => "REGISTER_AND_MOVE",
            REPLACE_LOST_RESERVATION => "REPLACE_LOST_RESERVATION",
            _ => "UNKNOWN",
        }
    }
}

/// Persistent reservation types (SPC-4 table 219).
pub mod pr_type {
    pub const WRITE_EXCLUSIVE: u8 = 0x1;
    pub const EXCLUSIVE_ACCESS: u8 = 0x3;
    pub const WRITE_EXCLUSIVE_REGISTRANTS_ONLY: u8 = 0x5;
    pub const EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: u8 = 0x6;
    pub const WRITE_EXCLUSIVE_ALL_REGISTRANTS: u8 = 0x7;
    pub const EXCLUSIVE_ACCESS_ALL_REGISTRANTS: u8 = 0x8;

    /// Whether `t` is one of the six defined types.
    pub fn is_valid(t: u8) -> bool {
        matches!(t, 1 | 3 | 5 | 6 | 7 | 8)
    }

    /// All-registrants types: every registrant is a holder.
    pub fn is_all_registrants(t: u8) -> bool {
        matches!(t, 7 | 8)
    }

    pub fn name(t: u8) -> &'static str {
        match t {
            1 => "Write Exclusive",
            3 => "Exclusive Access",
            5 => "Write Exclusive, registrants only",
            6 => "Exclusive Access, registrants only",
            7 => "Write Exclusive, all registrants",
            8 => "Exclusive Access, all registrants",
            _ => "obsolete or reserved",
        }
    }
}

/// A decoded PERSISTENT RESERVE IN CDB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrInCdb {
    pub service_action: u8,
    pub allocation_length: u16,
}

/// A decoded PERSISTENT RESERVE OUT CDB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrOutCdb {
    pub service_action: u8,
    pub scope: u8,
    pub pr_type: u8,
    /// PARAMETER LIST LENGTH, CDB bytes 5..8.
    pub parameter_list_length: u32,
}

/// The number of bytes that follow a CDB on the helper socket, or that a
/// PR IN may return: the BE16 at bytes 7..8, as QEMU's `scsi_cdb_xfer()`
/// computes it for group-2 opcodes.
pub fn transfer_length(cdb: &[u8; 16]) -> usize {
    u16::from_be_bytes([cdb[7], cdb[8]]) as usize
}

impl PrInCdb {
    pub fn parse(cdb: &[u8]) -> Result<PrInCdb, SenseCode> {
        if cdb.len() < 10 || cdb[0] != PERSISTENT_RESERVE_IN {
            return Err(SenseCode::INVALID_OPCODE);
        }
        Ok(PrInCdb {
            service_action: cdb[1] & 0x1f,
            allocation_length: u16::from_be_bytes([cdb[7], cdb[8]]),
        })
    }

    /// The 10-byte CDB for this command.
    pub fn encode(&self) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0] = PERSISTENT_RESERVE_IN;
        c[1] = self.service_action & 0x1f;
        c[7..9].copy_from_slice(&self.allocation_length.to_be_bytes());
        c
    }
}

impl PrOutCdb {
    pub fn parse(cdb: &[u8]) -> Result<PrOutCdb, SenseCode> {
        if cdb.len() < 10 || cdb[0] != PERSISTENT_RESERVE_OUT {
            return Err(SenseCode::INVALID_OPCODE);
        }
        Ok(PrOutCdb {
            service_action: cdb[1] & 0x1f,
            scope: cdb[2] >> 4,
            pr_type: cdb[2] & 0x0f,
            parameter_list_length: u32::from_be_bytes([cdb[5], cdb[6], cdb[7], cdb[8]]),
        })
    }

    /// The 10-byte CDB for this command.
    pub fn encode(&self) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0] = PERSISTENT_RESERVE_OUT;
        c[1] = self.service_action & 0x1f;
        c[2] = (self.scope << 4) | (self.pr_type & 0x0f);
        c[5..9].copy_from_slice(&self.parameter_list_length.to_be_bytes());
        c
    }
}

/// Pad a CDB to the 16 bytes the helper protocol carries.
pub fn pad16(cdb: &[u8]) -> [u8; 16] {
    let mut c = [0u8; 16];
    let n = cdb.len().min(16);
    c[..n].copy_from_slice(&cdb[..n]);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_action_names() {
        let prin: Vec<&str> = (0..5).map(prin_sa::name).collect();
        assert_eq!(
            prin,
            [
                "READ_KEYS",
                "READ_RESERVATION",
                "REPORT_CAPABILITIES",
                "READ_FULL_STATUS",
                "UNKNOWN"
            ]
        );
        let prout: Vec<&str> = (0..10).map(prout_sa::name).collect();
        assert_eq!(
            prout,
            [
                "REGISTER",
                "RESERVE",
                "RELEASE",
                "CLEAR",
                "PREEMPT",
                "PREEMPT_AND_ABORT",
                "REGISTER_AND_IGNORE",
                "REGISTER_AND_MOVE",
                "REPLACE_LOST_RESERVATION",
                "UNKNOWN"
            ]
        );
        assert_eq!(prout_sa::name(0x1f), "UNKNOWN");
    }

    #[test]
    fn prin_read_keys_golden() {
        // sg_persist --in -k: 5e 00 00 00 00 00 00 20 00 00 (alloc 8192)
        let c = PrInCdb {
            service_action: prin_sa::READ_KEYS,
            allocation_length: 8192,
        };
        assert_eq!(c.encode(), [0x5e, 0, 0, 0, 0, 0, 0, 0x20, 0x00, 0]);
        assert_eq!(PrInCdb::parse(&c.encode()), Ok(c));
    }

    #[test]
    fn prin_service_action_is_masked() {
        let c = PrInCdb::parse(&[0x5e, 0xe3, 0, 0, 0, 0, 0, 0, 8, 0]).unwrap();
        assert_eq!(c.service_action, 3);
        assert_eq!(c.allocation_length, 8);
    }

    #[test]
    fn prout_reserve_golden() {
        let c = PrOutCdb {
            service_action: prout_sa::RESERVE,
            scope: 0,
            pr_type: pr_type::WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
            parameter_list_length: 24,
        };
        assert_eq!(c.encode(), [0x5f, 0x01, 0x05, 0, 0, 0, 0, 0, 24, 0]);
        assert_eq!(PrOutCdb::parse(&c.encode()), Ok(c));
    }

    #[test]
    fn transfer_length_uses_bytes_7_and_8_only() {
        let mut c = [0u8; 16];
        c[0] = 0x5f;
        c[5] = 0x01;
        c[6] = 0x00;
        c[8] = 24;
        assert_eq!(transfer_length(&c), 24);
        c[7] = 0x20;
        c[8] = 0x01;
        assert_eq!(transfer_length(&c), 8193);
    }

    #[test]
    fn wrong_opcode_is_rejected() {
        assert_eq!(PrInCdb::parse(&[0x5f; 10]), Err(SenseCode::INVALID_OPCODE));
        assert_eq!(PrOutCdb::parse(&[0x5e; 10]), Err(SenseCode::INVALID_OPCODE));
        assert_eq!(PrOutCdb::parse(&[0x5f; 4]), Err(SenseCode::INVALID_OPCODE));
    }

    #[test]
    fn types() {
        for t in 0..16u8 {
            assert_eq!(pr_type::is_valid(t), [1, 3, 5, 6, 7, 8].contains(&t));
        }
        assert!(pr_type::is_all_registrants(7) && !pr_type::is_all_registrants(5));
    }
}
