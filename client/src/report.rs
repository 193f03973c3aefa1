//! Human and JSON renderings of PR IN data and answers, for reservdctl.
#![forbid(unsafe_code)]

use std::fmt::Write;

use serde::{Serialize, Serializer};

use reservd_proto::cdb::{pr_type, prin_sa};
use reservd_proto::params::TransportId;
use reservd_proto::prin;
use reservd_proto::sense::{Answer, SenseCode, Status};

/// A 64-bit reservation key as reservd's JSON shows it: a string of hex
/// digits after `0x` (`"0x1234"`), since JSON numbers lose precision above
/// 2^53.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key(pub u64);

impl Serialize for Key {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("0x{:x}", self.0))
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn transport_id_text(t: &TransportId) -> String {
    match t {
        TransportId::Fc { n_port_name } => format!("FC N_Port name 0x{}", hex(n_port_name)),
        TransportId::Sas { address } => format!("SAS address 0x{}", hex(address)),
        TransportId::Iscsi { name, .. } => format!("iSCSI name {}", String::from_utf8_lossy(name)),
    }
}

/// Render PR IN data for service action `sa` as text, in the manner of
/// sg_persist.
pub fn prin_text(sa: u8, data: &[u8]) -> Result<String, prin::Truncated> {
    let mut o = String::new();
    match sa {
        prin_sa::READ_KEYS => {
            let (generation, keys, more) = prin::parse_read_keys(data)?;
            if keys.is_empty() && !more {
                let _ = writeln!(
                    o,
                    "  PR generation=0x{generation:x}, there are NO registered reservation keys"
                );
            } else {
                let _ = writeln!(
                    o,
                    "  PR generation=0x{generation:x}, {} registered reservation key(s) follow:",
                    keys.len()
                );
                for k in keys {
                    let _ = writeln!(o, "    0x{k:x}");
                }
                if more {
                    let _ = writeln!(o, "  (more keys than the allocation length holds)");
                }
            }
        }
        prin_sa::READ_RESERVATION => match prin::parse_read_reservation(data)? {
            (g, None) => {
                let _ = writeln!(o, "  PR generation=0x{g:x}, there is NO reservation held");
            }
            (g, Some(r)) => {
                let _ = writeln!(o, "  PR generation=0x{g:x}, Reservation follows:");
                let _ = writeln!(o, "    Key=0x{:x}", r.key);
                let _ = writeln!(
                    o,
                    "    scope: LU_SCOPE,  type: {}",
                    pr_type::name(r.pr_type)
                );
            }
        },
        prin_sa::REPORT_CAPABILITIES => {
            let c = prin::parse_report_capabilities(data)?;
            let _ = writeln!(
                o,
                "  CRH={} SIP_C={} ATP_C={} PTPL_C={} TMV={} ALLOW_COMMANDS={} PTPL_A={}",
                u8::from(c.crh),
                u8::from(c.sip_c),
                u8::from(c.atp_c),
                u8::from(c.ptpl_c),
                u8::from(c.tmv),
                c.allow_commands,
                u8::from(c.ptpl_a)
            );
            let types: Vec<&str> = [1u8, 3, 5, 6, 7, 8]
                .iter()
                .filter(|&&t| c.type_mask & prin::type_mask_bit(t) != 0)
                .map(|&t| pr_type::name(t))
                .collect();
            let _ = writeln!(o, "  Supported types: {}", types.join("; "));
        }
        prin_sa::READ_FULL_STATUS => {
            let (g, descs) = prin::parse_read_full_status(data)?;
            let _ = writeln!(o, "  PR generation=0x{g:x}, {} descriptor(s):", descs.len());
            for d in descs {
                let _ = writeln!(o, "    Key=0x{:x}", d.key);
                let _ = writeln!(
                    o,
                    "      All target ports bit {}, relative port 0x{:x}",
                    u8::from(d.all_tg_pt),
                    d.relative_target_port
                );
                if d.reservation_holder {
                    let _ = writeln!(
                        o,
                        "      << Reservation holder >> scope: LU_SCOPE, type: {}",
                        pr_type::name(d.pr_type)
                    );
                } else {
                    let _ = writeln!(o, "      not reservation holder");
                }
                match prin::descriptor_transport_id(&d) {
                    Some(t) => {
                        let _ = writeln!(o, "      {}", transport_id_text(&t));
                    }
                    None => {
                        let _ = writeln!(o, "      transport id 0x{}", hex(&d.transport_id));
                    }
                }
            }
        }
        _ => {
            let _ = writeln!(o, "  data: {}", hex(data));
        }
    }
    Ok(o)
}

/// PR IN data as one JSON object (without the answer's fields): serialized
/// by serde_json in the field order given here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum PrinJson {
    ReadKeys {
        generation: u32,
        keys: Vec<Key>,
        truncated: bool,
    },
    ReadReservation {
        generation: u32,
        reservation: Option<ReservationJson>,
    },
    Capabilities {
        crh: bool,
        sip_c: bool,
        atp_c: bool,
        ptpl_c: bool,
        tmv: bool,
        allow_commands: u8,
        ptpl_a: bool,
        type_mask: u16,
    },
    FullStatus {
        generation: u32,
        descriptors: Vec<DescriptorJson>,
    },
    /// Data of a service action reservd does not decode, in hex.
    Other { data: String },
}

/// A reservation in [`PrinJson::ReadReservation`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReservationJson {
    pub key: Key,
    pub scope: u8,
    #[serde(rename = "type")]
    pub pr_type: u8,
}

/// A READ FULL STATUS descriptor in [`PrinJson::FullStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DescriptorJson {
    pub key: Key,
    pub all_tg_pt: bool,
    pub holder: bool,
    pub scope: u8,
    #[serde(rename = "type")]
    pub pr_type: u8,
    pub relative_target_port: u16,
    /// The TransportID's bytes, in hex.
    pub transport_id: String,
}

/// PR IN data of service action `sa` as JSON.
pub fn prin_json(sa: u8, data: &[u8]) -> Result<PrinJson, prin::Truncated> {
    Ok(match sa {
        prin_sa::READ_KEYS => {
            let (generation, keys, truncated) = prin::parse_read_keys(data)?;
            PrinJson::ReadKeys {
                generation,
                keys: keys.into_iter().map(Key).collect(),
                truncated,
            }
        }
        prin_sa::READ_RESERVATION => {
            let (generation, r) = prin::parse_read_reservation(data)?;
            PrinJson::ReadReservation {
                generation,
                reservation: r.map(|r| ReservationJson {
                    key: Key(r.key),
                    scope: r.scope,
                    pr_type: r.pr_type,
                }),
            }
        }
        prin_sa::REPORT_CAPABILITIES => {
            let c = prin::parse_report_capabilities(data)?;
            PrinJson::Capabilities {
                crh: c.crh,
                sip_c: c.sip_c,
                atp_c: c.atp_c,
                ptpl_c: c.ptpl_c,
                tmv: c.tmv,
                allow_commands: c.allow_commands,
                ptpl_a: c.ptpl_a,
                type_mask: c.type_mask,
            }
        }
        prin_sa::READ_FULL_STATUS => {
            let (generation, descs) = prin::parse_read_full_status(data)?;
            PrinJson::FullStatus {
                generation,
                descriptors: descs
                    .iter()
                    .map(|d| DescriptorJson {
                        key: Key(d.key),
                        all_tg_pt: d.all_tg_pt,
                        holder: d.reservation_holder,
                        scope: d.scope,
                        pr_type: d.pr_type,
                        relative_target_port: d.relative_target_port,
                        transport_id: hex(&d.transport_id),
                    })
                    .collect(),
            }
        }
        _ => PrinJson::Other { data: hex(data) },
    })
}

/// One line describing an answer's status and sense.
pub fn answer_text(a: &Answer) -> String {
    match (a.status, SenseCode::parse(&a.sense)) {
        (Status::CHECK_CONDITION, Some(c)) => format!(
            "CHECK CONDITION, sense key 0x{:x} ASC 0x{:02x} ASCQ 0x{:02x} ({})",
            c.key,
            c.asc,
            c.ascq,
            sense_name(c)
        ),
        (s, _) => s.name().to_string(),
    }
}

/// A name for the sense codes reservd and PR targets use.
pub fn sense_name(c: SenseCode) -> &'static str {
    match c {
        SenseCode::NO_SENSE => "no sense",
        SenseCode::NOT_READY => "logical unit not ready",
        SenseCode::INVALID_PARAM_LEN => "parameter list length error",
        SenseCode::INVALID_OPCODE => "invalid command operation code",
        SenseCode::INVALID_FIELD => "invalid field in CDB",
        SenseCode::INVALID_PARAM => "invalid field in parameter list",
        SenseCode::INSUFFICIENT_REGISTRATION_RESOURCES => "insufficient registration resources",
        SenseCode::RESERVATIONS_PREEMPTED => "reservations preempted",
        SenseCode::RESERVATIONS_RELEASED => "reservations released",
        SenseCode::REGISTRATIONS_PREEMPTED => "registrations preempted",
        SenseCode::SCSI_BUS_RESET => "SCSI bus reset",
        SenseCode::IO_ERROR => "I/O process terminated",
        SenseCode::LUN_COMM_FAILURE => "logical unit communication failure",
        SenseCode::COMMAND_TIMEOUT => "command timeout",
        _ if c.key == 0x06 => "unit attention",
        _ if c.key == 0x05 && c.asc == 0x26 && c.ascq == 0x04 => {
            "invalid release of persistent reservation"
        }
        _ => "see SPC-4",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reservd_proto::prin::{read_keys, read_reservation, Reservation};

    #[test]
    fn read_keys_text_and_json() {
        let d = read_keys(2, &[0x1234, 0xabcdef]);
        let t = prin_text(prin_sa::READ_KEYS, &d).unwrap();
        assert!(t.contains("PR generation=0x2, 2 registered reservation key(s) follow:"));
        assert!(t.contains("    0x1234\n    0xabcdef\n"));
        assert_eq!(
            serde_json::to_string(&prin_json(prin_sa::READ_KEYS, &d).unwrap()).unwrap(),
            r#"{"generation":2,"keys":["0x1234","0xabcdef"],"truncated":false}"#
        );
        let none = prin_text(prin_sa::READ_KEYS, &read_keys(0, &[])).unwrap();
        assert!(none.contains("NO registered reservation keys"));
    }

    #[test]
    fn reservation_text_and_json() {
        let d = read_reservation(
            5,
            Some(Reservation {
                key: 0x99,
                scope: 0,
                pr_type: 5,
            }),
        );
        let t = prin_text(prin_sa::READ_RESERVATION, &d).unwrap();
        assert!(t.contains("Key=0x99"));
        assert!(t.contains("Write Exclusive, registrants only"));
        assert_eq!(
            serde_json::to_string(&prin_json(prin_sa::READ_RESERVATION, &d).unwrap()).unwrap(),
            r#"{"generation":5,"reservation":{"key":"0x99","scope":0,"type":5}}"#
        );
    }

    #[test]
    fn answers() {
        assert_eq!(
            answer_text(&Answer::status(Status::RESERVATION_CONFLICT)),
            "RESERVATION CONFLICT"
        );
        assert_eq!(
            answer_text(&Answer::check(SenseCode::INVALID_FIELD)),
            "CHECK CONDITION, sense key 0x5 ASC 0x24 ASCQ 0x00 (invalid field in CDB)"
        );
        assert_eq!(
            serde_json::to_string("a\"b\\c\n").unwrap(),
            r#""a\"b\\c\n""#
        );
        assert_eq!(
            serde_json::to_string(&Key(u64::MAX)).unwrap(),
            r#""0xffffffffffffffff""#
        );
    }
}
