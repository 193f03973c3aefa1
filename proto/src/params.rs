//! PERSISTENT RESERVE OUT parameter lists and TransportIDs (SPC-4 6.16.3,
//! 7.6.4).
#![forbid(unsafe_code)]

use crate::cdb::prout_sa;
use crate::sense::SenseCode;

/// Size of the basic PR OUT parameter list.
pub const BASIC_PARAMS_LEN: usize = 24;

pub const FLAG_APTPL: u8 = 0x01;
pub const FLAG_ALL_TG_PT: u8 = 0x04;
pub const FLAG_SPEC_I_PT: u8 = 0x08;

pub const PROTOCOL_FC: u8 = 0x0;
pub const PROTOCOL_ISCSI: u8 = 0x5;
pub const PROTOCOL_SAS: u8 = 0x6;

/// Most TransportIDs a parameter list may name: libmpathpersist's
/// `MPATH_MX_TIDS` (it aborts on more; qemu-pr-helper passes them on).
pub const MAX_TRANSPORT_IDS: usize = 32;
/// Largest iSCSI TransportID ADDITIONAL LENGTH: libmpathpersist sends only
/// the low byte of the length field, and the length is a multiple of 4.
pub const MAX_ISCSI_LEN: usize = 252;

/// A TransportID naming an initiator port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TransportId {
    /// Fibre Channel: the N_Port name.
    Fc { n_port_name: [u8; 8] },
    /// SAS: the SAS address.
    Sas { address: [u8; 8] },
    /// iSCSI, format 00 (device name) or 01 (port identifier). `name` is the
    /// text before the first NUL (for format 01 it includes `,i,0x<ISID>`).
    Iscsi { format: u8, name: Vec<u8> },
}

impl TransportId {
    pub fn protocol(&self) -> u8 {
        match self {
            TransportId::Fc { .. } => PROTOCOL_FC,
            TransportId::Sas { .. } => PROTOCOL_SAS,
            TransportId::Iscsi { .. } => PROTOCOL_ISCSI,
        }
    }

    /// Decode the TransportID at the start of `b`; returns it and its length.
    ///
    /// This is the one TransportID parser: the multipath translation, the
    /// emulated target and reservdctl's renderings all use it, with the
    /// bounds libmpathpersist needs. Byte 0 holds the FORMAT CODE (bits
    /// 7..6) and the PROTOCOL IDENTIFIER (bits 3..0; bits 5..4 are not
    /// looked at). FC
    /// and SAS (format 00) are 24 bytes; iSCSI (format 00, device name, or
    /// 01, port identifier) has a 4-byte header whose ADDITIONAL LENGTH is
    /// a multiple of 4 from 4 to [`MAX_ISCSI_LEN`], and a NUL-terminated
    /// name in that many bytes. Anything else, and a TransportID that runs
    /// past `b` (SPC-4 says so of a truncated one; QEMU and LIO agree), is
    /// INVALID FIELD IN PARAMETER LIST.
    pub fn parse(b: &[u8]) -> Result<(TransportId, usize), SenseCode> {
        let first = *b.first().ok_or(SenseCode::INVALID_PARAM)?;
        let format = first >> 6;
        match first & 0xcf {
            PROTOCOL_FC => {
                let t = b.get(..24).ok_or(SenseCode::INVALID_PARAM)?;
                Ok((
                    TransportId::Fc {
                        n_port_name: t[8..16].try_into().unwrap(),
                    },
                    24,
                ))
            }
            PROTOCOL_SAS => {
                let t = b.get(..24).ok_or(SenseCode::INVALID_PARAM)?;
                Ok((
                    TransportId::Sas {
                        address: t[4..12].try_into().unwrap(),
                    },
                    24,
                ))
            }
            p if p & 0x0f == PROTOCOL_ISCSI && format <= 1 => {
                let hdr = b.get(..4).ok_or(SenseCode::INVALID_PARAM)?;
                let len = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
                if len == 0 || len > MAX_ISCSI_LEN || len % 4 != 0 {
                    return Err(SenseCode::INVALID_PARAM);
                }
                let body = b.get(4..4 + len).ok_or(SenseCode::INVALID_PARAM)?;
                let end = body
                    .iter()
                    .position(|&c| c == 0)
                    .ok_or(SenseCode::INVALID_PARAM)?;
                Ok((
                    TransportId::Iscsi {
                        format,
                        name: body[..end].to_vec(),
                    },
                    4 + len,
                ))
            }
            _ => Err(SenseCode::INVALID_PARAM),
        }
    }

    /// Encode in SPC-4 form (iSCSI names are NUL-terminated and padded to a
    /// multiple of 4, at least 20 bytes in all).
    pub fn encode(&self) -> Vec<u8> {
        match self {
            TransportId::Fc { n_port_name } => {
                let mut t = vec![0u8; 24];
                t[0] = PROTOCOL_FC;
                t[8..16].copy_from_slice(n_port_name);
                t
            }
            TransportId::Sas { address } => {
                let mut t = vec![0u8; 24];
                t[0] = PROTOCOL_SAS;
                t[4..12].copy_from_slice(address);
                t
            }
            TransportId::Iscsi { format, name } => {
                let len = (name.len() + 1).next_multiple_of(4).max(16);
                let mut t = vec![0u8; 4 + len];
                t[0] = (format << 6) | PROTOCOL_ISCSI;
                t[2..4].copy_from_slice(&(len as u16).to_be_bytes());
                t[4..4 + name.len()].copy_from_slice(name);
                t
            }
        }
    }
}

/// A decoded PR OUT parameter list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProutParams {
    pub key: u64,
    pub sa_key: u64,
    pub spec_i_pt: bool,
    pub all_tg_pt: bool,
    pub aptpl: bool,
    /// REGISTER AND MOVE only: UNREG bit and relative target port.
    pub unreg: bool,
    pub relative_target_port: u16,
    /// With SPEC_I_PT (or REGISTER AND MOVE), the initiator ports named.
    pub transport_ids: Vec<TransportId>,
}

impl ProutParams {
    /// Decode `p` for service action `sa`. Errors are the sense to answer.
    pub fn parse(sa: u8, p: &[u8]) -> Result<ProutParams, SenseCode> {
        if p.len() < BASIC_PARAMS_LEN {
            return Err(SenseCode::INVALID_PARAM_LEN);
        }
        let key = u64::from_be_bytes(p[0..8].try_into().unwrap());
        let sa_key = u64::from_be_bytes(p[8..16].try_into().unwrap());
        if sa == prout_sa::REGISTER_AND_MOVE {
            let tid_len = u32::from_be_bytes(p[20..24].try_into().unwrap()) as usize;
            // LIO: a TransportID length that does not match the list is
            // INVALID FIELD IN PARAMETER LIST.
            if tid_len == 0 || BASIC_PARAMS_LEN + tid_len != p.len() {
                return Err(SenseCode::INVALID_PARAM);
            }
            let (tid, used) = TransportId::parse(&p[BASIC_PARAMS_LEN..])?;
            if used != tid_len {
                return Err(SenseCode::INVALID_PARAM);
            }
            return Ok(ProutParams {
                key,
                sa_key,
                aptpl: p[17] & 0x01 != 0,
                unreg: p[17] & 0x02 != 0,
                relative_target_port: u16::from_be_bytes([p[18], p[19]]),
                transport_ids: vec![tid],
                ..Default::default()
            });
        }
        let flags = p[20];
        let mut out = ProutParams {
            key,
            sa_key,
            spec_i_pt: flags & FLAG_SPEC_I_PT != 0,
            all_tg_pt: flags & FLAG_ALL_TG_PT != 0,
            aptpl: flags & FLAG_APTPL != 0,
            ..Default::default()
        };
        if !out.spec_i_pt {
            if p.len() != BASIC_PARAMS_LEN {
                return Err(SenseCode::INVALID_PARAM_LEN);
            }
            return Ok(out);
        }
        out.transport_ids = parse_transport_ids(&p[BASIC_PARAMS_LEN..])?
            .into_iter()
            .map(|(tid, _)| tid)
            .collect();
        Ok(out)
    }

    /// Encode the list as service action `sa` lays it out: REGISTER AND
    /// MOVE has its own layout (UNREG, relative target port, one
    /// TransportID with its length at bytes 20..23); the others are
    /// [`ProutParams::encode`].
    pub fn encode_for(&self, sa: u8) -> Vec<u8> {
        if sa != prout_sa::REGISTER_AND_MOVE {
            return self.encode();
        }
        let mut p = vec![0u8; BASIC_PARAMS_LEN];
        p[0..8].copy_from_slice(&self.key.to_be_bytes());
        p[8..16].copy_from_slice(&self.sa_key.to_be_bytes());
        p[17] = (if self.aptpl { 0x01 } else { 0 }) | (if self.unreg { 0x02 } else { 0 });
        p[18..20].copy_from_slice(&self.relative_target_port.to_be_bytes());
        let tid: Vec<u8> = self.transport_ids.iter().flat_map(|t| t.encode()).collect();
        p[20..24].copy_from_slice(&(tid.len() as u32).to_be_bytes());
        p.extend_from_slice(&tid);
        p
    }

    /// Encode the basic parameter list (and transport IDs with SPEC_I_PT).
    pub fn encode(&self) -> Vec<u8> {
        let mut p = vec![0u8; BASIC_PARAMS_LEN];
        p[0..8].copy_from_slice(&self.key.to_be_bytes());
        p[8..16].copy_from_slice(&self.sa_key.to_be_bytes());
        p[20] = (if self.spec_i_pt { FLAG_SPEC_I_PT } else { 0 })
            | (if self.all_tg_pt { FLAG_ALL_TG_PT } else { 0 })
            | (if self.aptpl { FLAG_APTPL } else { 0 });
        if self.spec_i_pt {
            let tids: Vec<u8> = self.transport_ids.iter().flat_map(|t| t.encode()).collect();
            p.extend_from_slice(&(tids.len() as u32).to_be_bytes());
            p.extend_from_slice(&tids);
        }
        p
    }
}

/// Decode the TransportID list that follows the basic parameter list: a
/// BE32 length, then that many bytes of TransportIDs, at most
/// [`MAX_TRANSPORT_IDS`] of them; each comes with the bytes it was decoded
/// from. A list too short for the length field is PARAMETER LIST LENGTH
/// ERROR (as QEMU); a length that does not match the bytes that follow is
/// INVALID FIELD IN PARAMETER LIST (as QEMU, for a length beyond the data,
/// and LIO), and so is a 33rd TransportID.
pub fn parse_transport_ids(rest: &[u8]) -> Result<Vec<(TransportId, &[u8])>, SenseCode> {
    let hdr = rest.get(..4).ok_or(SenseCode::INVALID_PARAM_LEN)?;
    let len = u32::from_be_bytes(hdr.try_into().unwrap()) as usize;
    let body = &rest[4..];
    if len != body.len() {
        return Err(SenseCode::INVALID_PARAM);
    }
    let mut ids = Vec::new();
    let mut at = 0;
    while at < len {
        if ids.len() == MAX_TRANSPORT_IDS {
            return Err(SenseCode::INVALID_PARAM);
        }
        let (tid, used) = TransportId::parse(&body[at..])?;
        ids.push((tid, &body[at..at + used]));
        at += used;
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(key: u64, sa_key: u64, flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa_key.to_be_bytes());
        p[20] = flags;
        p
    }

    #[test]
    fn register_and_move_round_trips_in_its_own_layout() {
        // Found by fuzzing: the basic encoding of a REGISTER AND MOVE list
        // does not parse back as one.
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&0xd08b_3a65_6c00_0000u64.to_be_bytes());
        p[17] = 0x03;
        p[18..20].copy_from_slice(&7u16.to_be_bytes());
        let tid = TransportId::Sas { address: [0x22; 8] }.encode();
        p[20..24].copy_from_slice(&(tid.len() as u32).to_be_bytes());
        p.extend_from_slice(&tid);
        let sa = prout_sa::REGISTER_AND_MOVE;
        let parsed = ProutParams::parse(sa, &p).unwrap();
        assert!(parsed.unreg && parsed.aptpl);
        assert_eq!(parsed.relative_target_port, 7);
        assert_eq!(parsed.encode_for(sa), p);
        assert_eq!(
            ProutParams::parse(sa, &parsed.encode_for(sa)),
            Ok(parsed.clone())
        );
        // Other service actions keep the basic layout.
        assert_eq!(parsed.encode_for(prout_sa::REGISTER), parsed.encode());
    }

    #[test]
    fn basic_register() {
        let p = ProutParams::parse(prout_sa::REGISTER, &basic(0, 0x1122, 0)).unwrap();
        assert_eq!((p.key, p.sa_key), (0, 0x1122));
        assert!(!p.spec_i_pt && !p.aptpl && !p.all_tg_pt);
        assert_eq!(p.encode(), basic(0, 0x1122, 0));
    }

    #[test]
    fn flags() {
        let p = ProutParams::parse(0, &basic(1, 2, FLAG_APTPL | FLAG_ALL_TG_PT)).unwrap();
        assert!(p.aptpl && p.all_tg_pt && !p.spec_i_pt);
    }

    #[test]
    fn short_or_long_lists_are_length_errors() {
        assert_eq!(
            ProutParams::parse(0, &[0; 23]),
            Err(SenseCode::INVALID_PARAM_LEN)
        );
        assert_eq!(
            ProutParams::parse(0, &[0; 28]),
            Err(SenseCode::INVALID_PARAM_LEN)
        );
        assert_eq!(
            ProutParams::parse(0, &[]),
            Err(SenseCode::INVALID_PARAM_LEN)
        );
    }

    #[test]
    fn spec_i_pt_with_fc_sas_iscsi() {
        let tids = vec![
            TransportId::Fc {
                n_port_name: [1, 2, 3, 4, 5, 6, 7, 8],
            },
            TransportId::Sas { address: [9; 8] },
            TransportId::Iscsi {
                format: 0,
                name: b"iqn.2026-11.example:node1".to_vec(),
            },
            TransportId::Iscsi {
                format: 1,
                name: b"iqn.x,i,0x123456".to_vec(),
            },
        ];
        let p = ProutParams {
            sa_key: 7,
            spec_i_pt: true,
            transport_ids: tids.clone(),
            ..Default::default()
        };
        let bytes = p.encode();
        // FC golden layout.
        assert_eq!(&bytes[24..28], &((bytes.len() - 28) as u32).to_be_bytes());
        assert_eq!(bytes[28], 0x00);
        assert_eq!(&bytes[36..44], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(bytes[52], 0x06);
        assert_eq!(&bytes[56..64], &[9; 8]);
        // iSCSI: length 28 (25 chars + NUL, padded to 4).
        assert_eq!(bytes[76], 0x05);
        assert_eq!(&bytes[78..80], &[0, 28]);
        let back = ProutParams::parse(prout_sa::REGISTER, &bytes).unwrap();
        assert_eq!(back.transport_ids, tids);
    }

    #[test]
    fn transport_id_errors() {
        // Unknown protocol (SRP = 4).
        let mut t = vec![0u8; 24];
        t[0] = 0x04;
        assert_eq!(TransportId::parse(&t), Err(SenseCode::INVALID_PARAM));
        // iSCSI length not a multiple of 4.
        let mut t = vec![0x05, 0, 0, 18];
        t.extend_from_slice(&[b'a'; 18]);
        assert_eq!(TransportId::parse(&t), Err(SenseCode::INVALID_PARAM));
        // iSCSI name without NUL.
        let mut t = vec![0x05, 0, 0, 20];
        t.extend_from_slice(&[b'a'; 20]);
        assert_eq!(TransportId::parse(&t), Err(SenseCode::INVALID_PARAM));
        // iSCSI longer than the data.
        let t = vec![0x05, 0, 0, 20, b'a', 0];
        assert_eq!(TransportId::parse(&t), Err(SenseCode::INVALID_PARAM));
        // FC and SAS truncated.
        assert_eq!(
            TransportId::parse(&[0u8; 10]),
            Err(SenseCode::INVALID_PARAM)
        );
        assert_eq!(
            TransportId::parse(&[0x06; 23]),
            Err(SenseCode::INVALID_PARAM)
        );
    }

    #[test]
    fn the_parameter_list_parser_has_the_librarys_bounds() {
        let list = |tids: &[Vec<u8>]| {
            let mut p = basic(0, 1, FLAG_SPEC_I_PT);
            let body = tids.concat();
            p.extend_from_slice(&(body.len() as u32).to_be_bytes());
            p.extend_from_slice(&body);
            ProutParams::parse(prout_sa::REGISTER, &p)
        };
        let sas = |i: u8| TransportId::Sas { address: [i; 8] }.encode();
        let ids: Vec<Vec<u8>> = (0..33).map(sas).collect();
        assert_eq!(list(&ids[..32]).unwrap().transport_ids.len(), 32);
        assert_eq!(list(&ids), Err(SenseCode::INVALID_PARAM));
        let iscsi = |len: u16, name: &[u8]| {
            let mut t = vec![0x05, 0];
            t.extend_from_slice(&len.to_be_bytes());
            let mut body = name.to_vec();
            body.resize(len as usize, 0);
            t.extend_from_slice(&body);
            t
        };
        // 4 to 252 bytes, a multiple of 4, with a NUL.
        assert_eq!(
            list(&[iscsi(4, b"iqn")]).unwrap().transport_ids,
            vec![TransportId::Iscsi {
                format: 0,
                name: b"iqn".to_vec()
            }]
        );
        assert!(list(&[iscsi(252, b"iqn.x")]).is_ok());
        assert_eq!(list(&[iscsi(256, b"iqn.x")]), Err(SenseCode::INVALID_PARAM));
        assert_eq!(list(&[iscsi(0, b"")]), Err(SenseCode::INVALID_PARAM));
        assert_eq!(list(&[iscsi(4, b"iqn.")]), Err(SenseCode::INVALID_PARAM));
        // A format code FC and SAS do not have.
        let mut t = sas(1);
        t[0] |= 0x40;
        assert_eq!(list(&[t]), Err(SenseCode::INVALID_PARAM));
    }

    #[test]
    fn transport_id_length_must_match_list() {
        let mut p = basic(0, 1, FLAG_SPEC_I_PT);
        p.extend_from_slice(&100u32.to_be_bytes());
        p.extend_from_slice(&[0u8; 24]);
        assert_eq!(ProutParams::parse(0, &p), Err(SenseCode::INVALID_PARAM));
        // Bytes beyond the declared TransportIDs.
        let mut p = basic(0, 1, FLAG_SPEC_I_PT);
        p.extend_from_slice(&24u32.to_be_bytes());
        p.extend_from_slice(&[0u8; 28]);
        assert_eq!(ProutParams::parse(0, &p), Err(SenseCode::INVALID_PARAM));
        // A TransportID running past the declared length.
        let mut p = basic(0, 1, FLAG_SPEC_I_PT);
        p.extend_from_slice(&20u32.to_be_bytes());
        p.extend_from_slice(&[0u8; 20]);
        assert_eq!(ProutParams::parse(0, &p), Err(SenseCode::INVALID_PARAM));
        let mut p = basic(0, 1, FLAG_SPEC_I_PT);
        p.extend_from_slice(&[0, 0]);
        assert_eq!(ProutParams::parse(0, &p), Err(SenseCode::INVALID_PARAM_LEN));
    }

    #[test]
    fn register_and_move() {
        let mut p = basic(5, 6, 0);
        p[17] = 0x03;
        p[18..20].copy_from_slice(&2u16.to_be_bytes());
        let tid = TransportId::Sas { address: [4; 8] }.encode();
        p[20..24].copy_from_slice(&(tid.len() as u32).to_be_bytes());
        p.extend_from_slice(&tid);
        let m = ProutParams::parse(prout_sa::REGISTER_AND_MOVE, &p).unwrap();
        assert!(m.unreg && m.aptpl);
        assert_eq!(m.relative_target_port, 2);
        assert_eq!(m.transport_ids, vec![TransportId::Sas { address: [4; 8] }]);
        // A TRANSPORTID PARAMETER DATA LENGTH that does not match the list.
        let mut short = p.clone();
        short.push(0);
        assert_eq!(
            ProutParams::parse(prout_sa::REGISTER_AND_MOVE, &short),
            Err(SenseCode::INVALID_PARAM)
        );
        assert_eq!(
            ProutParams::parse(prout_sa::REGISTER_AND_MOVE, &p[..24]),
            Err(SenseCode::INVALID_PARAM)
        );
    }
}
