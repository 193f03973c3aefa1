//! Translation between the SCSI commands QEMU sends and libmpathpersist's
//! API, without I/O.
//!
//! PR OUT: the CDB and parameter list become a [`ProutRequest`]: service
//! action, scope, type, the 24 bytes that begin `struct
//! prout_param_descriptor`, and one 258-byte `struct transportid` per
//! TransportID. Every input libmpathpersist (or qemu-pr-helper in front of
//! it) mishandles is answered here with sense data: the TransportIDs are
//! decoded by [`parse_transport_ids`], which refuses more than
//! [`crate::params::MAX_TRANSPORT_IDS`], truncated or inconsistent lists,
//! iSCSI names whose length is not a multiple of 4, above
//! [`crate::params::MAX_ISCSI_LEN`] or without
//! a NUL; REGISTER AND MOVE and REPLACE LOST RESERVATION, which the library
//! cannot express, are INVALID FIELD IN CDB as in qemu-pr-helper.
//!
//! PR IN: [`prin_data`] turns the `struct prin_resp` buffer the library
//! filled (some fields converted to host order) back into SPC-4 parameter
//! data, READ FULL STATUS included (qemu-pr-helper refuses it on
//! multipath). The result is exactly as long as the device's data (its
//! ADDITIONAL LENGTH plus the header, at most 8192 bytes), not
//! qemu-pr-helper's zero-padded allocation length: the same length a guest
//! gets from a single-path disk through SG_IO, and from a real target. The
//! response encoder truncates it to the CDB's allocation length.
#![forbid(unsafe_code)]

use crate::cdb::{prin_sa, prout_sa};
use crate::params::{parse_transport_ids, TransportId};
use crate::params::{FLAG_SPEC_I_PT, PROTOCOL_FC, PROTOCOL_ISCSI, PROTOCOL_SAS};
use crate::prin::{read_full_status, FullStatusDescriptor};
use crate::sense::SenseCode;

/// `MPATH_MAX_PARAM_LEN`.
pub const MAX_PARAM_LEN: usize = 8192;
/// `sizeof(struct transportid)`: format code, protocol id, 256-byte union.
pub const TRANSPORTID_SIZE: usize = 258;
/// Size of the basic PR OUT parameter list and of the header of
/// `struct prout_param_descriptor`.
pub const PROUT_HEADER_SIZE: usize = 24;

/// `sizeof(struct prin_resp)`.
pub const PRIN_RESP_SIZE: usize = 8200;
/// `sizeof(struct prin_fulldescr)`.
pub const FULLDESCR_SIZE: usize = 270;
/// Offset of `private_buffer` (where the library packs the
/// `prin_fulldescr` records) in `struct prin_resp`.
pub const FULLDESCR_BASE: usize = 8;
/// Offset of `descriptors[]` (the library's pointers to those records).
pub const FULLDESCR_PTRS: usize = 8200;
/// Most READ FULL STATUS records that survive the library's decoder: it
/// packs 270-byte records from offset 8 and writes one 8-byte pointer per
/// record from offset 8200 over them. Records 0..=30 are complete whatever
/// the count; from the 32nd on, pointers overwrite records.
pub const FULLDESCR_INTACT: usize = 31;
/// Most records the decoder can write for a response of at most 8192
/// bytes (each takes at least 24 bytes of the device's data).
pub const FULLDESCR_WORST: usize = MAX_PARAM_LEN / 24 + 1;
/// Size of the READ FULL STATUS response buffer: large enough for
/// everything the library's unbounded decoder writes for a response of at
/// most 8192 bytes whose descriptors are each at least 24 bytes.
pub const FULLSTATUS_BUFFER_SIZE: usize = FULLDESCR_BASE + FULLDESCR_WORST * FULLDESCR_SIZE;

/// What `mpath_persistent_reserve_out` takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProutRequest {
    pub service_action: u8,
    pub scope: u8,
    pub pr_type: u8,
    /// Key, service action key, flags: the first 24 bytes of
    /// `struct prout_param_descriptor` (obsolete and reserved bytes 0).
    pub header: [u8; PROUT_HEADER_SIZE],
    /// `struct transportid` records, in the order given.
    pub transport_ids: Vec<[u8; TRANSPORTID_SIZE]>,
}

impl ProutRequest {
    /// An unregister (REGISTER AND IGNORE EXISTING KEY, all-zero list), as
    /// the CLEANUP extension issues.
    pub fn unregister() -> ProutRequest {
        ProutRequest {
            service_action: prout_sa::REGISTER_AND_IGNORE,
            scope: 0,
            pr_type: 0,
            header: [0; PROUT_HEADER_SIZE],
            transport_ids: Vec::new(),
        }
    }

    pub fn sa_key(&self) -> u64 {
        u64::from_be_bytes(self.header[8..16].try_into().unwrap())
    }
}

/// Decode a PR OUT command for libmpathpersist. `Err` is the sense of the
/// CHECK CONDITION to answer.
pub fn prout_request(cdb: &[u8; 16], params: &[u8]) -> Result<ProutRequest, SenseCode> {
    if params.len() < PROUT_HEADER_SIZE {
        return Err(SenseCode::INVALID_PARAM_LEN);
    }
    let service_action = cdb[1] & 0x1f;
    match service_action {
        prout_sa::REGISTER
        | prout_sa::RESERVE
        | prout_sa::RELEASE
        | prout_sa::CLEAR
        | prout_sa::PREEMPT
        | prout_sa::PREEMPT_AND_ABORT
        | prout_sa::REGISTER_AND_IGNORE => {}
        // REGISTER AND MOVE has no place in struct prout_param_descriptor;
        // REPLACE LOST RESERVATION is unknown to the library.
        _ => return Err(SenseCode::INVALID_FIELD),
    }
    let mut header = [0u8; PROUT_HEADER_SIZE];
    header[..16].copy_from_slice(&params[..16]);
    let flags = params[20];
    header[20] = flags;
    let transport_ids = if flags & FLAG_SPEC_I_PT != 0 {
        transport_ids(&params[PROUT_HEADER_SIZE..])?
    } else {
        // Without SPEC_I_PT the list is exactly 24 bytes (SPC-4 6.16.3),
        // as a device reached through SG_IO would insist.
        if params.len() != PROUT_HEADER_SIZE {
            return Err(SenseCode::INVALID_PARAM_LEN);
        }
        Vec::new()
    };
    Ok(ProutRequest {
        service_action,
        scope: cdb[2] >> 4,
        pr_type: cdb[2] & 0x0f,
        header,
        transport_ids,
    })
}

/// The TransportID list after the basic parameter list (a BE32 length,
/// then that many bytes) as `struct transportid` records.
fn transport_ids(rest: &[u8]) -> Result<Vec<[u8; TRANSPORTID_SIZE]>, SenseCode> {
    Ok(parse_transport_ids(rest)?
        .into_iter()
        .map(|(_, bytes)| transportid(bytes))
        .collect())
}

/// The `struct transportid` for the SPC-4 TransportID `t` (as
/// [`TransportId::parse`] accepted it).
fn transportid(t: &[u8]) -> [u8; TRANSPORTID_SIZE] {
    let mut rec = [0u8; TRANSPORTID_SIZE];
    // The library ORs format_code and protocol_id into byte 0, so the
    // format code stays in bits 7..6.
    rec[0] = t[0] & 0xc0;
    rec[1] = t[0] & 0x0f;
    match rec[1] {
        PROTOCOL_FC => rec[2..10].copy_from_slice(&t[8..16]),
        PROTOCOL_SAS => rec[2..10].copy_from_slice(&t[4..12]),
        // iSCSI: iscsi_name holds the 2-byte length, then the name (with
        // whatever follows its NUL).
        _ => rec[2..t.len()].copy_from_slice(&t[2..]),
    }
    rec
}

/// The PR IN service actions reservd runs through libmpathpersist.
pub fn prin_service_action(cdb: &[u8; 16]) -> Result<u8, SenseCode> {
    match cdb[1] & 0x1f {
        sa @ (prin_sa::READ_KEYS
        | prin_sa::READ_RESERVATION
        | prin_sa::REPORT_CAPABILITIES
        | prin_sa::READ_FULL_STATUS) => Ok(sa),
        _ => Err(SenseCode::INVALID_FIELD),
    }
}

/// Size of the response buffer to hand the library for `sa`.
pub fn prin_buffer_size(sa: u8) -> usize {
    if sa == prin_sa::READ_FULL_STATUS {
        FULLSTATUS_BUFFER_SIZE
    } else {
        PRIN_RESP_SIZE
    }
}

fn ne16(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn ne32(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
}

/// Why READ FULL STATUS data from the library cannot be reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FullStatusError {
    /// More descriptors than survive the library's decoder.
    TooManyDescriptors(u32),
}

/// Turn the `struct prin_resp` buffer libmpathpersist filled for service
/// action `sa` into SPC-4 PR IN parameter data. `resp` is at least
/// [`prin_buffer_size`] bytes, zeroed before the call.
pub fn prin_data(sa: u8, resp: &[u8]) -> Result<Vec<u8>, FullStatusError> {
    assert!(resp.len() >= prin_buffer_size(sa), "short PR IN buffer");
    match sa {
        prin_sa::REPORT_CAPABILITIES => {
            // length and pr_type_mask were converted to host order; bytes
            // 6..7 are reserved.
            let mut d = vec![0u8; 8];
            d[0..2].copy_from_slice(&ne16(resp, 0).to_be_bytes());
            d[2] = resp[2];
            d[3] = resp[3];
            d[4..6].copy_from_slice(&ne16(resp, 4).to_be_bytes());
            Ok(d)
        }
        prin_sa::READ_FULL_STATUS => full_status(resp),
        // READ KEYS and READ RESERVATION: the two leading u32 were
        // converted to host order, the rest is the device's bytes.
        _ => Ok(raw_with_header(resp, ne32(resp, 4))),
    }
}

/// Header in big-endian order plus the device's bytes after it, as much as
/// ADDITIONAL LENGTH says and the 8192-byte response holds.
fn raw_with_header(resp: &[u8], additional: u32) -> Vec<u8> {
    let n = (additional as usize).min(MAX_PARAM_LEN - 8);
    let mut d = Vec::with_capacity(8 + n);
    d.extend_from_slice(&ne32(resp, 0).to_be_bytes());
    d.extend_from_slice(&additional.to_be_bytes());
    d.extend_from_slice(&resp[8..8 + n]);
    d
}

fn full_status(resp: &[u8]) -> Result<Vec<u8>, FullStatusError> {
    let generation = ne32(resp, 0);
    let count = ne32(resp, 4);
    // The decoder bails out (leaving the device's raw data and its
    // ADDITIONAL LENGTH in place) when that length is above 8192; after
    // decoding, the count is at most FULLDESCR_WORST.
    if count as usize > MAX_PARAM_LEN {
        return Ok(raw_with_header(resp, count));
    }
    if count as usize > FULLDESCR_INTACT {
        return Err(FullStatusError::TooManyDescriptors(count));
    }
    let descs: Vec<FullStatusDescriptor> = (0..count as usize)
        .map(|i| {
            let r = &resp[FULLDESCR_BASE + i * FULLDESCR_SIZE..][..FULLDESCR_SIZE];
            FullStatusDescriptor {
                key: u64::from_be_bytes(r[0..8].try_into().unwrap()),
                all_tg_pt: r[8] & 0x02 != 0,
                reservation_holder: r[8] & 0x01 != 0,
                scope: r[9] >> 4,
                pr_type: r[9] & 0x0f,
                relative_target_port: ne16(r, 10),
                transport_id: encode_transport_id(&r[12..12 + TRANSPORTID_SIZE]),
            }
        })
        .collect();
    Ok(read_full_status(generation, &descs))
}

/// SPC-4 TransportID bytes for a `struct transportid` as the library's
/// READ FULL STATUS decoder fills it: format code shifted down to bits
/// 1..0, the iSCSI name alone (no length) at the start of the union.
fn encode_transport_id(t: &[u8]) -> Vec<u8> {
    let format = t[0] & 0x03;
    let protocol = t[1] & 0x0f;
    let u = &t[2..];
    match protocol {
        PROTOCOL_FC if format == 0 => TransportId::Fc {
            n_port_name: u[..8].try_into().unwrap(),
        }
        .encode(),
        PROTOCOL_SAS if format == 0 => TransportId::Sas {
            address: u[..8].try_into().unwrap(),
        }
        .encode(),
        PROTOCOL_ISCSI if format <= 1 => {
            let end = u.iter().position(|&c| c == 0).unwrap_or(u.len());
            TransportId::Iscsi {
                format,
                name: u[..end].to_vec(),
            }
            .encode()
        }
        // A protocol the library does not decode: its identity is lost;
        // report the protocol with an empty 24-byte body.
        _ => {
            let mut v = vec![0u8; 24];
            v[0] = (format << 6) | protocol;
            v
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdb::{pad16, PrOutCdb};
    use crate::params::{FLAG_ALL_TG_PT, FLAG_APTPL};
    use crate::prin::parse_read_full_status;

    fn cdb_out(sa: u8, pr_type: u8, len: usize) -> [u8; 16] {
        pad16(
            &PrOutCdb {
                service_action: sa,
                scope: 0,
                pr_type,
                parameter_list_length: len as u32,
            }
            .encode(),
        )
    }

    fn basic(key: u64, sa_key: u64, flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa_key.to_be_bytes());
        p[16..20].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        p[20] = flags;
        p[21] = 0x55;
        p
    }

    fn with_tids(mut p: Vec<u8>, tids: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = tids.concat();
        p.extend_from_slice(&(body.len() as u32).to_be_bytes());
        p.extend_from_slice(&body);
        p
    }

    fn fc(name: [u8; 8]) -> Vec<u8> {
        TransportId::Fc { n_port_name: name }.encode()
    }

    fn iscsi_raw(first: u8, len: u16, name: &[u8]) -> Vec<u8> {
        let mut t = vec![first, 0];
        t.extend_from_slice(&len.to_be_bytes());
        let mut body = name.to_vec();
        body.resize(len as usize, 0);
        t.extend_from_slice(&body);
        t
    }

    #[test]
    fn every_supported_service_action_passes_through() {
        for sa in 0..=6u8 {
            let p = basic(0x1111, 0x2222, FLAG_APTPL | FLAG_ALL_TG_PT);
            let r = prout_request(&cdb_out(sa, 5, 24), &p).unwrap();
            assert_eq!(r.service_action, sa);
            assert_eq!((r.scope, r.pr_type), (0, 5));
            assert_eq!(&r.header[..16], &p[..16]);
            // Obsolete and reserved bytes are not copied; flags are.
            assert_eq!(&r.header[16..], &[0, 0, 0, 0, 0x05, 0, 0, 0]);
            assert!(r.transport_ids.is_empty());
            assert_eq!(r.sa_key(), 0x2222);
        }
    }

    #[test]
    fn scope_and_type_come_from_cdb_byte_2() {
        let mut cdb = cdb_out(prout_sa::RESERVE, 0, 24);
        cdb[2] = 0x17;
        let r = prout_request(&cdb, &basic(1, 0, 0)).unwrap();
        assert_eq!((r.scope, r.pr_type), (1, 7));
    }

    #[test]
    fn register_and_move_and_replace_lost_are_invalid_field_in_cdb() {
        for sa in [7u8, 8, 9, 0x1f] {
            assert_eq!(
                prout_request(&cdb_out(sa, 0, 24), &basic(1, 2, 0)),
                Err(SenseCode::INVALID_FIELD)
            );
        }
    }

    #[test]
    fn short_list_is_a_length_error_before_anything_else() {
        assert_eq!(
            prout_request(&cdb_out(7, 0, 23), &[0; 23]),
            Err(SenseCode::INVALID_PARAM_LEN)
        );
        assert_eq!(
            prout_request(&cdb_out(0, 0, 0), &[]),
            Err(SenseCode::INVALID_PARAM_LEN)
        );
    }

    #[test]
    fn extra_bytes_without_spec_i_pt_are_a_length_error() {
        let mut p = basic(0, 1, 0);
        p.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(
            prout_request(&cdb_out(0, 0, 28), &p),
            Err(SenseCode::INVALID_PARAM_LEN)
        );
    }

    #[test]
    fn fc_sas_and_iscsi_transport_ids() {
        let sas = TransportId::Sas {
            address: [0x50, 1, 2, 3, 4, 5, 6, 7],
        }
        .encode();
        let iq = iscsi_raw(0x05, 28, b"iqn.2026-01.org.example:vm1");
        let iq1 = iscsi_raw(0x45, 36, b"iqn.2026-01.org.example,i,0x1234");
        let p = with_tids(
            basic(0, 0xabc, FLAG_SPEC_I_PT),
            &[fc([1, 2, 3, 4, 5, 6, 7, 8]), sas, iq.clone(), iq1.clone()],
        );
        let r = prout_request(&cdb_out(0, 0, p.len()), &p).unwrap();
        assert_eq!(r.header[20], FLAG_SPEC_I_PT);
        assert_eq!(r.transport_ids.len(), 4);
        let t = &r.transport_ids;
        assert_eq!(&t[0][..10], &[0x00, 0x00, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(t[0][10..].iter().all(|&b| b == 0));
        assert_eq!(&t[1][..10], &[0x00, 0x06, 0x50, 1, 2, 3, 4, 5, 6, 7]);
        // iSCSI: the length field, then the name, as the library expects.
        assert_eq!(&t[2][..4], &[0x00, 0x05, 0, 28]);
        assert_eq!(&t[2][4..4 + 28], &iq[4..]);
        assert_eq!(&t[3][..4], &[0x40, 0x05, 0, 36]);
        assert_eq!(&t[3][4..40], &iq1[4..]);
    }

    #[test]
    fn thirty_two_ids_pass_thirty_three_are_refused() {
        let ids: Vec<Vec<u8>> = (0..33u8).map(|i| fc([i; 8])).collect();
        let p = with_tids(basic(0, 1, FLAG_SPEC_I_PT), &ids[..32]);
        assert_eq!(
            prout_request(&cdb_out(0, 0, p.len()), &p)
                .unwrap()
                .transport_ids
                .len(),
            32
        );
        let p = with_tids(basic(0, 1, FLAG_SPEC_I_PT), &ids);
        assert_eq!(
            prout_request(&cdb_out(0, 0, p.len()), &p),
            Err(SenseCode::INVALID_PARAM)
        );
        // 340 SAS ids fit in 8 KiB: still an answer, not an abort.
        let many: Vec<Vec<u8>> = (0..340u16)
            .map(|i| {
                TransportId::Sas {
                    address: [i as u8; 8],
                }
                .encode()
            })
            .collect();
        let p = with_tids(basic(0, 1, FLAG_SPEC_I_PT), &many);
        assert!(p.len() <= 8192);
        assert_eq!(
            prout_request(&cdb_out(0, 0, p.len()), &p),
            Err(SenseCode::INVALID_PARAM)
        );
    }

    #[test]
    fn inconsistent_lists_are_refused() {
        let spec = |tail: &[u8]| {
            let mut p = basic(0, 1, FLAG_SPEC_I_PT);
            p.extend_from_slice(tail);
            prout_request(&cdb_out(0, 0, p.len()), &p)
        };
        // No room for the length field.
        assert_eq!(spec(&[0, 0]), Err(SenseCode::INVALID_PARAM_LEN));
        // Length field larger than the data, including values that wrapped
        // around in qemu-pr-helper's signed arithmetic.
        for len in [100u32, 0x7fff_ffe4, 0xffff_ffe4, 0xffff_ffff] {
            let mut t = len.to_be_bytes().to_vec();
            t.extend_from_slice(&fc([1; 8]));
            assert_eq!(spec(&t), Err(SenseCode::INVALID_PARAM), "len {len:#x}");
        }
        // Length field smaller than the data.
        let mut t = 20u32.to_be_bytes().to_vec();
        t.extend_from_slice(&fc([1; 8]));
        assert_eq!(spec(&t), Err(SenseCode::INVALID_PARAM));
        // A truncated FC id (length says 12).
        let mut t = 12u32.to_be_bytes().to_vec();
        t.extend_from_slice(&fc([1; 8])[..12]);
        assert_eq!(spec(&t), Err(SenseCode::INVALID_PARAM));
        // Unknown protocol (SRP) and FC with a format code.
        for first in [0x04u8, 0x40, 0x46, 0x85] {
            let mut id = fc([1; 8]);
            id[0] = first;
            let mut t = 24u32.to_be_bytes().to_vec();
            t.extend_from_slice(&id);
            assert_eq!(spec(&t), Err(SenseCode::INVALID_PARAM), "{first:#x}");
        }
        // An empty list with SPEC_I_PT is fine.
        assert!(spec(&[0, 0, 0, 0]).unwrap().transport_ids.is_empty());
    }

    #[test]
    fn bad_iscsi_names_are_refused() {
        let check = |id: Vec<u8>| {
            let p = with_tids(basic(0, 1, FLAG_SPEC_I_PT), &[id]);
            prout_request(&cdb_out(0, 0, p.len()), &p)
        };
        // Not a multiple of 4.
        assert_eq!(
            check(iscsi_raw(0x05, 18, b"iqn.a")),
            Err(SenseCode::INVALID_PARAM)
        );
        // Longer than 252.
        assert_eq!(
            check(iscsi_raw(0x05, 256, b"iqn.a")),
            Err(SenseCode::INVALID_PARAM)
        );
        // 252 is the largest accepted.
        let ok = check(iscsi_raw(0x05, 252, b"iqn.a")).unwrap();
        assert_eq!(&ok.transport_ids[0][2..4], &[0, 252]);
        // No NUL in the name.
        let mut t = vec![0x05, 0, 0, 20];
        t.extend_from_slice(&[b'a'; 20]);
        assert_eq!(check(t), Err(SenseCode::INVALID_PARAM));
        // Zero length.
        assert_eq!(check(vec![0x05, 0, 0, 0]), Err(SenseCode::INVALID_PARAM));
        // Length beyond the list.
        let mut t = iscsi_raw(0x05, 20, b"iqn.a");
        t.truncate(12);
        assert_eq!(check(t), Err(SenseCode::INVALID_PARAM));
        // Header cut short.
        assert_eq!(check(vec![0x05, 0]), Err(SenseCode::INVALID_PARAM));
    }

    #[test]
    fn cleanup_unregister_is_an_all_zero_register_and_ignore() {
        let r = ProutRequest::unregister();
        assert_eq!(r.service_action, 6);
        assert_eq!(r.header, [0; 24]);
        assert_eq!(r.sa_key(), 0);
    }

    #[test]
    fn prin_service_actions() {
        for sa in 0..=3u8 {
            let mut c = [0u8; 16];
            c[0] = 0x5e;
            c[1] = sa | 0xe0;
            assert_eq!(prin_service_action(&c), Ok(sa));
        }
        let mut c = [0u8; 16];
        c[1] = 4;
        assert_eq!(prin_service_action(&c), Err(SenseCode::INVALID_FIELD));
    }

    /// A response buffer as the library leaves it: leading fields in host
    /// order, the rest the device's bytes.
    fn resp(sa: u8, generation: u32, second: u32, rest: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; prin_buffer_size(sa)];
        b[0..4].copy_from_slice(&generation.to_ne_bytes());
        b[4..8].copy_from_slice(&second.to_ne_bytes());
        b[8..8 + rest.len()].copy_from_slice(rest);
        b
    }

    #[test]
    fn read_keys_is_exactly_the_device_length() {
        let keys = [0x1122334455667788u64.to_be_bytes(), 0xabu64.to_be_bytes()].concat();
        let d = prin_data(0, &resp(0, 7, 16, &keys)).unwrap();
        assert_eq!(d.len(), 24);
        assert_eq!(&d[..8], &[0, 0, 0, 7, 0, 0, 0, 16]);
        assert_eq!(&d[8..], &keys[..]);
        // No keys: the header only.
        assert_eq!(
            prin_data(0, &resp(0, 9, 0, &[])).unwrap(),
            [0, 0, 0, 9, 0, 0, 0, 0]
        );
    }

    #[test]
    fn read_keys_beyond_8192_keeps_the_additional_length() {
        let d = prin_data(0, &resp(0, 1, 9000, &[0xee; 8184])).unwrap();
        assert_eq!(d.len(), 8192);
        assert_eq!(&d[4..8], &9000u32.to_be_bytes());
        assert!(d[8..].iter().all(|&b| b == 0xee));
    }

    #[test]
    fn read_reservation_golden() {
        let mut body = [0u8; 16];
        body[..8].copy_from_slice(&0xaabbu64.to_be_bytes());
        body[13] = 0x05;
        let d = prin_data(1, &resp(1, 3, 16, &body)).unwrap();
        assert_eq!(
            d,
            [0, 0, 0, 3, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0xaa, 0xbb, 0, 0, 0, 0, 0, 0x05, 0, 0]
        );
    }

    #[test]
    fn report_capabilities_converts_back_to_big_endian() {
        let mut b = vec![0u8; PRIN_RESP_SIZE];
        b[0..2].copy_from_slice(&8u16.to_ne_bytes());
        b[2] = 0x1d;
        b[3] = 0x80;
        b[4..6].copy_from_slice(&0xea01u16.to_ne_bytes());
        b[6] = 0x77; // reserved, dropped
        assert_eq!(
            prin_data(2, &b).unwrap(),
            [0x00, 0x08, 0x1d, 0x80, 0xea, 0x01, 0x00, 0x00]
        );
    }

    /// One prin_fulldescr record as the library's decoder writes it.
    fn fulldescr(
        key: u64,
        flag: u8,
        st: u8,
        rtpi: u16,
        format: u8,
        proto: u8,
        u: &[u8],
    ) -> Vec<u8> {
        let mut r = vec![0u8; FULLDESCR_SIZE];
        r[0..8].copy_from_slice(&key.to_be_bytes());
        r[8] = flag;
        r[9] = st;
        r[10..12].copy_from_slice(&rtpi.to_ne_bytes());
        r[12] = format;
        r[13] = proto;
        r[14..14 + u.len()].copy_from_slice(u);
        r
    }

    #[test]
    fn read_full_status_is_re_encoded() {
        let recs = [
            fulldescr(0x1234, 0x01, 0x05, 1, 0, 6, &[0x50, 1, 2, 3, 4, 5, 6, 7]),
            fulldescr(0x1234, 0x02, 0x00, 2, 0, 0, &[9; 8]),
            fulldescr(0x99, 0x00, 0x00, 3, 1, 5, b"iqn.x,i,0x01\0"),
            fulldescr(0x77, 0x00, 0x00, 4, 0, 4, &[]),
        ]
        .concat();
        let d = prin_data(3, &resp(3, 42, 4, &recs)).unwrap();
        let (generation, descs) = parse_read_full_status(&d).unwrap();
        assert_eq!(generation, 42);
        assert_eq!(descs.len(), 4);
        assert_eq!(descs[0].key, 0x1234);
        assert!(descs[0].reservation_holder && !descs[0].all_tg_pt);
        assert_eq!((descs[0].scope, descs[0].pr_type), (0, 5));
        assert_eq!(descs[0].relative_target_port, 1);
        // SAS, golden bytes.
        let mut sas = vec![0u8; 24];
        sas[0] = 0x06;
        sas[4..12].copy_from_slice(&[0x50, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(descs[0].transport_id, sas);
        assert!(descs[1].all_tg_pt && !descs[1].reservation_holder);
        assert_eq!(&descs[1].transport_id[8..16], &[9; 8]);
        assert_eq!(descs[1].transport_id[0], 0x00);
        // iSCSI port identifier: format 01, NUL-terminated, padded to 4.
        let t = &descs[2].transport_id;
        assert_eq!(t[0], 0x45);
        assert_eq!(&t[2..4], &[0, 16]);
        assert_eq!(&t[4..16], b"iqn.x,i,0x01");
        assert_eq!(t.len(), 20);
        // Unknown protocol: 24 bytes, protocol kept.
        assert_eq!(descs[3].transport_id, {
            let mut v = vec![0u8; 24];
            v[0] = 0x04;
            v
        });
        // Header + 3 × (24 + 24) ... exact ADDITIONAL LENGTH.
        assert_eq!(d.len(), 8 + 4 * 24 + 24 + 24 + 20 + 24);
        assert_eq!(&d[4..8], &((d.len() - 8) as u32).to_be_bytes());
    }

    #[test]
    fn read_full_status_empty() {
        assert_eq!(
            prin_data(3, &resp(3, 5, 0, &[])).unwrap(),
            [0, 0, 0, 5, 0, 0, 0, 0]
        );
    }

    #[test]
    fn read_full_status_limits() {
        let rec = fulldescr(1, 0, 0, 1, 0, 6, &[1; 8]);
        let recs: Vec<u8> = rec.repeat(31);
        let d = prin_data(3, &resp(3, 1, 31, &recs)).unwrap();
        assert_eq!(parse_read_full_status(&d).unwrap().1.len(), 31);
        // 32 or more: the library has overwritten records.
        assert_eq!(
            prin_data(3, &resp(3, 1, 32, &recs)),
            Err(FullStatusError::TooManyDescriptors(32))
        );
        // ADDITIONAL LENGTH above 8192: the decoder left the raw data.
        let raw = [0xabu8; 8184];
        let d = prin_data(3, &resp(3, 6, 9000, &raw)).unwrap();
        assert_eq!(d.len(), 8192);
        assert_eq!(&d[..8], &[0, 0, 0, 6, 0, 0, 0x23, 0x28]);
        assert!(d[8..].iter().all(|&b| b == 0xab));
    }

    /// Replays the library decoder's stores for `n` records: record i at
    /// 8 + 270 i, then pointer i at 8200 + 8 i.
    fn decoder_stores(n: usize) -> Vec<u8> {
        let mut b = vec![0u8; FULLSTATUS_BUFFER_SIZE];
        for i in 0..n {
            let at = FULLDESCR_BASE + i * FULLDESCR_SIZE;
            b[at..at + FULLDESCR_SIZE].fill((i % 200) as u8 + 1);
            let p = FULLDESCR_PTRS + i * 8;
            b[p..p + 8].fill(0xff);
        }
        b
    }

    #[test]
    fn decoder_worst_case_fits_and_first_31_records_survive() {
        for n in [1, 30, 31, 32, 33, 100, FULLDESCR_WORST] {
            // Indexing would panic if the stores left the buffer.
            let b = decoder_stores(n);
            for i in 0..n.min(FULLDESCR_INTACT) {
                let at = FULLDESCR_BASE + i * FULLDESCR_SIZE;
                assert!(
                    b[at..at + FULLDESCR_SIZE]
                        .iter()
                        .all(|&x| x == (i % 200) as u8 + 1),
                    "record {i} of {n} damaged"
                );
            }
        }
        // With 33 records, record 31 is hit by pointer 31 or 32.
        let b = decoder_stores(33);
        let at = FULLDESCR_BASE + 31 * FULLDESCR_SIZE;
        assert!(b[at..at + FULLDESCR_SIZE].contains(&0xff));
    }
}
