//! PERSISTENT RESERVE IN parameter data (SPC-4 6.15): builders for the
//! emulated target and the multipath translation, parsers for clients.
#![forbid(unsafe_code)]

use crate::params::TransportId;

/// A reservation as READ RESERVATION reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub key: u64,
    pub scope: u8,
    pub pr_type: u8,
}

/// REPORT CAPABILITIES fields (SPC-4 6.15.4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Replace Lost Reservation Capable.
    pub rlr_c: bool,
    /// Compatible Reservation Handling.
    pub crh: bool,
    /// Specify Initiator Ports Capable.
    pub sip_c: bool,
    /// All Target Ports Capable.
    pub atp_c: bool,
    /// Persist Through Power Loss Capable.
    pub ptpl_c: bool,
    /// Type Mask Valid.
    pub tmv: bool,
    pub allow_commands: u8,
    /// Persist Through Power Loss Activated.
    pub ptpl_a: bool,
    /// The TYPE MASK as the device's two bytes read big-endian: bit 15
    /// WR_EX_AR, 14 EX_AC_RO, 13 WR_EX_RO, 11 EX_AC, 9 WR_EX, 0 EX_AC_AR.
    pub type_mask: u16,
}

/// TYPE MASK bit for a reservation type, or 0 for an undefined type.
pub fn type_mask_bit(pr_type: u8) -> u16 {
    match pr_type {
        1 => 1 << 9,
        3 => 1 << 11,
        5 => 1 << 13,
        6 => 1 << 14,
        7 => 1 << 15,
        8 => 1 << 0,
        _ => 0,
    }
}

/// One READ FULL STATUS descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FullStatusDescriptor {
    pub key: u64,
    pub all_tg_pt: bool,
    pub reservation_holder: bool,
    pub scope: u8,
    pub pr_type: u8,
    pub relative_target_port: u16,
    pub transport_id: Vec<u8>,
}

fn header(generation: u32, additional: usize) -> Vec<u8> {
    let mut d = Vec::with_capacity(8 + additional);
    d.extend_from_slice(&generation.to_be_bytes());
    d.extend_from_slice(&(additional as u32).to_be_bytes());
    d
}

pub fn read_keys(generation: u32, keys: &[u64]) -> Vec<u8> {
    let mut d = header(generation, keys.len() * 8);
    for k in keys {
        d.extend_from_slice(&k.to_be_bytes());
    }
    d
}

pub fn read_reservation(generation: u32, r: Option<Reservation>) -> Vec<u8> {
    match r {
        None => header(generation, 0),
        Some(r) => {
            let mut d = header(generation, 16);
            d.extend_from_slice(&r.key.to_be_bytes());
            d.extend_from_slice(&[0, 0, 0, 0, 0, (r.scope << 4) | (r.pr_type & 0x0f), 0, 0]);
            d
        }
    }
}

pub fn report_capabilities(c: &Capabilities) -> Vec<u8> {
    let b2 = (u8::from(c.rlr_c) << 7)
        | (u8::from(c.crh) << 4)
        | (u8::from(c.sip_c) << 3)
        | (u8::from(c.atp_c) << 2)
        | u8::from(c.ptpl_c);
    let b3 = (u8::from(c.tmv) << 7) | ((c.allow_commands & 7) << 4) | u8::from(c.ptpl_a);
    let m = c.type_mask.to_be_bytes();
    vec![0, 8, b2, b3, m[0], m[1], 0, 0]
}

pub fn read_full_status(generation: u32, descs: &[FullStatusDescriptor]) -> Vec<u8> {
    let body: usize = descs.iter().map(|d| 24 + d.transport_id.len()).sum();
    let mut out = header(generation, body);
    for d in descs {
        out.extend_from_slice(&d.key.to_be_bytes());
        out.extend_from_slice(&[0; 4]);
        out.push((u8::from(d.all_tg_pt) << 1) | u8::from(d.reservation_holder));
        out.push((d.scope << 4) | (d.pr_type & 0x0f));
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&d.relative_target_port.to_be_bytes());
        out.extend_from_slice(&(d.transport_id.len() as u32).to_be_bytes());
        out.extend_from_slice(&d.transport_id);
    }
    out
}

/// Why PR IN data could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Truncated;

fn be32(d: &[u8], at: usize) -> Result<u32, Truncated> {
    Ok(u32::from_be_bytes(
        d.get(at..at + 4).ok_or(Truncated)?.try_into().unwrap(),
    ))
}

fn be64(d: &[u8], at: usize) -> Result<u64, Truncated> {
    Ok(u64::from_be_bytes(
        d.get(at..at + 8).ok_or(Truncated)?.try_into().unwrap(),
    ))
}

/// Decoded READ KEYS data: generation, the keys present in `d`, and
/// whether the device had more than `d` holds.
pub fn parse_read_keys(d: &[u8]) -> Result<(u32, Vec<u64>, bool), Truncated> {
    let generation = be32(d, 0)?;
    let len = be32(d, 4)? as usize;
    let avail = d.len().saturating_sub(8).min(len) / 8;
    let keys = (0..avail)
        .map(|i| be64(d, 8 + i * 8))
        .collect::<Result<_, _>>()?;
    Ok((generation, keys, d.len() < 8 + len))
}

pub fn parse_read_reservation(d: &[u8]) -> Result<(u32, Option<Reservation>), Truncated> {
    let generation = be32(d, 0)?;
    if be32(d, 4)? < 16 {
        return Ok((generation, None));
    }
    let st = *d.get(21).ok_or(Truncated)?;
    Ok((
        generation,
        Some(Reservation {
            key: be64(d, 8)?,
            scope: st >> 4,
            pr_type: st & 0x0f,
        }),
    ))
}

pub fn parse_report_capabilities(d: &[u8]) -> Result<Capabilities, Truncated> {
    let d = d.get(..6).ok_or(Truncated)?;
    Ok(Capabilities {
        rlr_c: d[2] & 0x80 != 0,
        crh: d[2] & 0x10 != 0,
        sip_c: d[2] & 0x08 != 0,
        atp_c: d[2] & 0x04 != 0,
        ptpl_c: d[2] & 0x01 != 0,
        tmv: d[3] & 0x80 != 0,
        allow_commands: (d[3] >> 4) & 7,
        ptpl_a: d[3] & 0x01 != 0,
        type_mask: u16::from_be_bytes([d[4], d[5]]),
    })
}

/// Decoded READ FULL STATUS data: the generation and the descriptors that
/// are whole in `d` (data cut to an allocation length may end inside one).
pub fn parse_read_full_status(d: &[u8]) -> Result<(u32, Vec<FullStatusDescriptor>), Truncated> {
    let generation = be32(d, 0)?;
    let end = (8 + be32(d, 4)? as usize).min(d.len());
    let mut at = 8;
    let mut out = Vec::new();
    while at + 24 <= end {
        let tid_len = be32(d, at + 20)? as usize;
        let Some(tid) = d
            .get(at + 24..at + 24 + tid_len)
            .filter(|_| at + 24 + tid_len <= end)
        else {
            break;
        };
        out.push(FullStatusDescriptor {
            key: be64(d, at)?,
            all_tg_pt: d[at + 12] & 0x02 != 0,
            reservation_holder: d[at + 12] & 0x01 != 0,
            scope: d[at + 13] >> 4,
            pr_type: d[at + 13] & 0x0f,
            relative_target_port: u16::from_be_bytes([d[at + 18], d[at + 19]]),
            transport_id: tid.to_vec(),
        });
        at += 24 + tid_len;
    }
    Ok((generation, out))
}

/// Decode a descriptor's TransportID, if it is one reservd understands.
pub fn descriptor_transport_id(d: &FullStatusDescriptor) -> Option<TransportId> {
    TransportId::parse(&d.transport_id).ok().map(|(t, _)| t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_keys_golden_and_truncation() {
        let d = read_keys(3, &[0x1122334455667788, 0xabcd]);
        assert_eq!(&d[..8], &[0, 0, 0, 3, 0, 0, 0, 16]);
        assert_eq!(&d[8..16], &[0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]);
        assert_eq!(
            parse_read_keys(&d),
            Ok((3, vec![0x1122334455667788, 0xabcd], false))
        );
        // An 8-byte allocation keeps the header and its full ADDITIONAL LENGTH.
        assert_eq!(parse_read_keys(&d[..8]), Ok((3, vec![], true)));
        assert_eq!(
            parse_read_keys(&d[..20]),
            Ok((3, vec![0x1122334455667788], true))
        );
        assert_eq!(parse_read_keys(&d[..4]), Err(Truncated));
    }

    #[test]
    fn read_reservation_golden() {
        assert_eq!(read_reservation(9, None), vec![0, 0, 0, 9, 0, 0, 0, 0]);
        let r = Reservation {
            key: 0xaa,
            scope: 0,
            pr_type: 5,
        };
        let d = read_reservation(9, Some(r));
        assert_eq!(d.len(), 24);
        assert_eq!(&d[4..8], &[0, 0, 0, 16]);
        assert_eq!(d[21], 0x05);
        assert_eq!(parse_read_reservation(&d), Ok((9, Some(r))));
        assert_eq!(
            parse_read_reservation(&read_reservation(1, None)),
            Ok((1, None))
        );
    }

    #[test]
    fn report_capabilities_golden() {
        let c = Capabilities {
            crh: true,
            sip_c: true,
            atp_c: true,
            ptpl_c: true,
            tmv: true,
            allow_commands: 1,
            type_mask: [1, 3, 5, 6, 7, 8]
                .iter()
                .fold(0, |m, &t| m | type_mask_bit(t)),
            ..Default::default()
        };
        let d = report_capabilities(&c);
        // As LIO reports it (target_core_pr.c sets ALLOW COMMANDS to 001b):
        // 00 08 1d 90 ea 01 00 00.
        assert_eq!(d, vec![0x00, 0x08, 0x1d, 0x90, 0xea, 0x01, 0x00, 0x00]);
        assert_eq!(parse_report_capabilities(&d), Ok(c));
        let c = Capabilities {
            ptpl_a: true,
            allow_commands: 0,
            ..c
        };
        assert_eq!(report_capabilities(&c)[3], 0x81);
    }

    #[test]
    fn full_status_round_trip() {
        let descs = vec![
            FullStatusDescriptor {
                key: 1,
                all_tg_pt: false,
                reservation_holder: true,
                scope: 0,
                pr_type: 5,
                relative_target_port: 1,
                transport_id: TransportId::Sas { address: [1; 8] }.encode(),
            },
            FullStatusDescriptor {
                key: 2,
                all_tg_pt: true,
                reservation_holder: false,
                scope: 0,
                pr_type: 0,
                relative_target_port: 2,
                transport_id: TransportId::Iscsi {
                    format: 0,
                    name: b"iqn.a".to_vec(),
                }
                .encode(),
            },
        ];
        let d = read_full_status(4, &descs);
        assert_eq!(&d[4..8], &((48 + 24 + 20) as u32).to_be_bytes());
        assert_eq!(d[8 + 12], 0x01);
        assert_eq!(d[8 + 13], 0x05);
        assert_eq!(parse_read_full_status(&d), Ok((4, descs.clone())));
        assert_eq!(
            descriptor_transport_id(&descs[1]),
            Some(TransportId::Iscsi {
                format: 0,
                name: b"iqn.a".to_vec()
            })
        );
        // Truncated to the first descriptor only.
        let (_, short) = parse_read_full_status(&d[..8 + 48]).unwrap();
        assert_eq!(short.len(), 1);
        // Cut inside the second descriptor's TransportID.
        let (_, short) = parse_read_full_status(&d[..8 + 48 + 30]).unwrap();
        assert_eq!(short, descs[..1]);
    }
}
