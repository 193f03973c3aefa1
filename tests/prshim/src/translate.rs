//! From an SG_IO call to a helper-protocol request, and from reservd's
//! answer back to what the kernel writes into the `sg_io_hdr`. No I/O.

use reservd_proto::cdb::{pad16, transfer_length, PERSISTENT_RESERVE_IN, PERSISTENT_RESERVE_OUT};
use reservd_proto::sense::{Answer, Status, SENSE_SIZE};
use reservd_proto::wire::{CDB_SIZE, DATA_SIZE};

use reservd_proto::sg::{SG_DXFER_FROM_DEV, SG_DXFER_TO_DEV};

/// `DRIVER_SENSE`: the kernel's driver status when sense came back.
pub const DRIVER_SENSE: u16 = 0x08;
/// `SG_INFO_CHECK`: some status field is not zero.
pub const SG_INFO_CHECK: u32 = 0x1;

/// Whether the shim sends a command with this opcode to reservd.
pub fn is_pr(opcode: u8) -> bool {
    opcode == PERSISTENT_RESERVE_IN || opcode == PERSISTENT_RESERVE_OUT
}

/// A request ready for the helper socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepared {
    pub cdb: [u8; CDB_SIZE],
    /// PR OUT: how many bytes of the caller's buffer follow the CDB.
    pub params_len: usize,
}

/// Check one SG_IO call carrying a PR IN or PR OUT CDB as QEMU's client
/// checks a guest's command before sending it; `Err` is the errno the
/// ioctl fails with (QEMU's client returns the same -EINVAL).
///
/// One deliberate difference: a PR IN whose allocation length is above
/// the 8192 bytes the protocol carries (QEMU refuses it; reservd would
/// close the connection) is sent with an allocation length of 8192. The
/// device then returns the same bytes as long as its answer fits in 8192
/// (its ADDITIONAL LENGTH still says how much there is), and the rest of
/// the caller's buffer is residual, as after a short transfer. Test tools
/// ask for 16384 bytes of READ KEYS as a matter of course.
pub fn prepare(cdb: &[u8], direction: i32, dxfer_len: usize) -> Result<Prepared, i32> {
    if cdb.is_empty() || cdb.len() > CDB_SIZE {
        return Err(libc::EINVAL);
    }
    let mut cdb = pad16(cdb);
    let len = transfer_length(&cdb);
    match cdb[0] {
        PERSISTENT_RESERVE_OUT => {
            if direction != SG_DXFER_TO_DEV || len > DATA_SIZE || dxfer_len < len {
                return Err(libc::EINVAL);
            }
            Ok(Prepared {
                cdb,
                params_len: len,
            })
        }
        PERSISTENT_RESERVE_IN => {
            if direction != SG_DXFER_FROM_DEV || dxfer_len < len {
                return Err(libc::EINVAL);
            }
            if len > DATA_SIZE {
                cdb[7..9].copy_from_slice(&(DATA_SIZE as u16).to_be_bytes());
            }
            Ok(Prepared { cdb, params_len: 0 })
        }
        _ => Err(libc::EINVAL),
    }
}

/// What the kernel would write into the `sg_io_hdr` for this answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    pub status: u8,
    pub masked_status: u8,
    pub host_status: u16,
    pub driver_status: u16,
    /// `sb_len_wr`: how many bytes of the answer's sense to copy to `sbp`.
    pub sense_len: u8,
    /// How many bytes of the answer's data to copy to the data buffer.
    pub data_len: usize,
    pub resid: i32,
    pub info: u32,
}

/// Fill the output fields the way Linux's SG_IO does for a command that
/// reached the device and came back with `resp`'s status:
/// `masked_status` is the status shifted right by one, `driver_status`
/// is DRIVER_SENSE for CHECK CONDITION, `info` has SG_INFO_CHECK when any
/// of those is set, sense is copied only for a status other than GOOD and
/// only when it is valid sense data (response code 0x70-0x73), as many
/// bytes as it says it has (8 + ADDITIONAL SENSE LENGTH, at most 96) up
/// to `mx_sb_len`, and `resid` is the part of the buffer not filled.
/// (QEMU's client, for a guest, copies `min(mx_sb_len, 96)` bytes of
/// sense for CHECK CONDITION; the bytes a caller looks at are the same.)
pub fn complete(resp: &Answer, pr_in: bool, dxfer_len: usize, mx_sb_len: u8) -> Completion {
    let status = resp.status.0;
    let good = resp.status == Status::GOOD;
    let sense_len = if !good && resp.sense[0] & 0x70 == 0x70 {
        (8 + resp.sense[7] as usize)
            .min(SENSE_SIZE)
            .min(mx_sb_len as usize)
    } else {
        0
    };
    let data_len = if good && pr_in {
        resp.data.len().min(dxfer_len)
    } else {
        0
    };
    let resid = if pr_in { dxfer_len - data_len } else { 0 };
    let masked_status = (status >> 1) & 0x7f;
    let driver_status = if status == Status::CHECK_CONDITION.0 {
        DRIVER_SENSE
    } else {
        0
    };
    let info = if masked_status != 0 || driver_status != 0 {
        SG_INFO_CHECK
    } else {
        0
    };
    Completion {
        status,
        masked_status,
        host_status: 0,
        driver_status,
        sense_len: sense_len as u8,
        data_len,
        resid: i32::try_from(resid).unwrap_or(i32::MAX),
        info,
    }
}

/// Copy the first `len` bytes of a scattered buffer into one vector.
pub fn gather(pieces: &[&[u8]], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for p in pieces {
        let n = p.len().min(len - out.len());
        out.extend_from_slice(&p[..n]);
        if out.len() == len {
            break;
        }
    }
    out
}

/// Copy `data` into a scattered buffer, piece after piece; returns how
/// many bytes found room.
pub fn scatter(data: &[u8], pieces: &mut [&mut [u8]]) -> usize {
    let mut done = 0;
    for p in pieces.iter_mut() {
        let n = p.len().min(data.len() - done);
        p[..n].copy_from_slice(&data[done..done + n]);
        done += n;
        if done == data.len() {
            break;
        }
    }
    done
}

/// One line for the trace file: the CDB's opcode and service action, and
/// the answer.
pub fn describe(cdb: &[u8; CDB_SIZE], resp: &Answer) -> String {
    let what = if cdb[0] == PERSISTENT_RESERVE_IN {
        "PR IN"
    } else {
        "PR OUT"
    };
    let mut s = format!(
        "{what} sa={:#04x} type={:#x} len={} -> status {:#04x}",
        cdb[1] & 0x1f,
        cdb[2] & 0x0f,
        transfer_length(cdb),
        resp.status.0
    );
    if let Some(c) = resp.sense_code() {
        s.push_str(&format!(
            " sense {:02x}/{:02x}/{:02x}",
            c.key, c.asc, c.ascq
        ));
    }
    if !resp.data.is_empty() {
        s.push_str(&format!(" data {} bytes", resp.data.len()));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use reservd_proto::sense::SenseCode;

    fn pr_out(sa: u8, len: u16) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0] = PERSISTENT_RESERVE_OUT;
        c[1] = sa;
        c[7..9].copy_from_slice(&len.to_be_bytes());
        c
    }

    fn pr_in(sa: u8, alloc: u16) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0] = PERSISTENT_RESERVE_IN;
        c[1] = sa;
        c[7..9].copy_from_slice(&alloc.to_be_bytes());
        c
    }

    fn response(status: u8, sense: &[u8], data: &[u8]) -> Answer {
        let mut s = [0u8; SENSE_SIZE];
        s[..sense.len()].copy_from_slice(sense);
        Answer {
            status: Status(status),
            sense: s,
            data: data.to_vec(),
        }
    }

    #[test]
    fn pr_out_sends_its_parameter_list() {
        let p = prepare(&pr_out(0x06, 24), SG_DXFER_TO_DEV, 24).unwrap();
        assert_eq!(p.params_len, 24);
        assert_eq!(&p.cdb[..10], &pr_out(0x06, 24));
        assert_eq!(&p.cdb[10..], &[0; 6]);
    }

    #[test]
    fn pr_in_above_the_protocol_limit_asks_for_8192_bytes() {
        let p = prepare(&pr_in(0x00, 16384), SG_DXFER_FROM_DEV, 16384).unwrap();
        assert_eq!(p.params_len, 0);
        assert_eq!(&p.cdb[..10], &pr_in(0x00, 8192));
        let p = prepare(&pr_in(0x00, 8), SG_DXFER_FROM_DEV, 8).unwrap();
        assert_eq!(&p.cdb[..10], &pr_in(0x00, 8));
    }

    #[test]
    fn refuses_what_qemu_refuses() {
        // wrong direction, buffer shorter than the CDB says, list too long,
        // no CDB or an oversized one
        assert_eq!(prepare(&pr_in(0, 8), SG_DXFER_TO_DEV, 8), Err(libc::EINVAL));
        assert_eq!(
            prepare(&pr_out(0, 24), SG_DXFER_FROM_DEV, 24),
            Err(libc::EINVAL)
        );
        assert_eq!(
            prepare(&pr_out(0, 24), SG_DXFER_TO_DEV, 23),
            Err(libc::EINVAL)
        );
        assert_eq!(
            prepare(&pr_in(0, 64), SG_DXFER_FROM_DEV, 63),
            Err(libc::EINVAL)
        );
        assert_eq!(
            prepare(&pr_out(0, 8193), SG_DXFER_TO_DEV, 8193),
            Err(libc::EINVAL)
        );
        assert_eq!(prepare(&[], SG_DXFER_TO_DEV, 0), Err(libc::EINVAL));
        assert_eq!(
            prepare(&[PERSISTENT_RESERVE_IN; 17], SG_DXFER_FROM_DEV, 64),
            Err(libc::EINVAL)
        );
    }

    #[test]
    fn good_pr_in_fills_the_buffer_and_leaves_the_rest_residual() {
        let data = [0, 0, 0, 5, 0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8];
        let c = complete(&response(0, &[], &data), true, 16384, 32);
        assert_eq!(
            c,
            Completion {
                status: 0,
                masked_status: 0,
                host_status: 0,
                driver_status: 0,
                sense_len: 0,
                data_len: 16,
                resid: 16384 - 16,
                info: 0,
            }
        );
    }

    #[test]
    fn check_condition_copies_the_sense_it_has() {
        // fixed format, ADDITIONAL SENSE LENGTH 10: 18 bytes
        let sense = SenseCode::LUN_COMM_FAILURE.fixed();
        let c = complete(&response(0x02, &sense, &[]), false, 24, 32);
        assert_eq!(c.status, 0x02);
        assert_eq!(c.masked_status, 0x01);
        assert_eq!(c.driver_status, DRIVER_SENSE);
        assert_eq!(c.info, SG_INFO_CHECK);
        assert_eq!(c.sense_len, 18);
        assert_eq!((c.data_len, c.resid), (0, 0));
        // no more than the caller's buffer
        assert_eq!(
            complete(&response(0x02, &sense, &[]), false, 24, 8).sense_len,
            8
        );
        // descriptor format with 0xf4 descriptor bytes: 96 at most
        let c = complete(
            &response(0x02, &[0x72, 5, 0x24, 0, 0, 0, 0, 0xf4], &[]),
            true,
            64,
            255,
        );
        assert_eq!(c.sense_len, 96);
        // a failed PR IN transferred nothing
        assert_eq!((c.data_len, c.resid), (0, 64));
    }

    #[test]
    fn reservation_conflict_has_a_status_and_no_sense() {
        let c = complete(&response(0x18, &[], &[]), false, 24, 32);
        assert_eq!(
            (
                c.status,
                c.masked_status,
                c.driver_status,
                c.sense_len,
                c.info
            ),
            (0x18, 0x0c, 0, 0, SG_INFO_CHECK)
        );
        // sense bytes that are not sense data are not copied either
        let c = complete(&response(0x02, &[0; 18], &[]), false, 24, 32);
        assert_eq!((c.driver_status, c.sense_len), (DRIVER_SENSE, 0));
    }

    #[test]
    fn data_is_gathered_and_scattered_across_pieces() {
        let (a, b) = ([1u8, 2, 3], [4u8, 5, 6, 7]);
        assert_eq!(gather(&[&a, &b], 5), vec![1, 2, 3, 4, 5]);
        assert_eq!(gather(&[&a, &b], 0), Vec::<u8>::new());
        let (mut x, mut y) = ([0u8; 2], [0u8; 4]);
        assert_eq!(scatter(&[9, 8, 7], &mut [&mut x, &mut y]), 3);
        assert_eq!((x, y), ([9, 8], [7, 0, 0, 0]));
        let mut z = [0u8; 2];
        assert_eq!(scatter(&[1, 2, 3], &mut [&mut z]), 2);
    }

    #[test]
    fn trace_lines_name_the_command_and_the_answer() {
        let sense = SenseCode::LUN_COMM_FAILURE.fixed();
        let line = describe(&pad16(&pr_out(0x00, 24)), &response(0x02, &sense, &[]));
        assert_eq!(
            line,
            "PR OUT sa=0x00 type=0x0 len=24 -> status 0x02 sense 0b/08/00"
        );
        let line = describe(&pad16(&pr_in(0x00, 8192)), &response(0, &[], &[0; 8]));
        assert_eq!(
            line,
            "PR IN sa=0x00 type=0x0 len=8192 -> status 0x00 data 8 bytes"
        );
    }
}
