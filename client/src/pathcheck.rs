//! Per-path view of a multipath map's persistent reservations, and the
//! verdict `reservdctl status` gives: is every key registered on every
//! usable path?
//!
//! PR IN READ KEYS lists the registrations of the whole logical unit, from
//! whichever path it is sent on: it cannot tell which path lacks a key. Each
//! path is an I_T nexus, and READ FULL STATUS names the nexus of every
//! registration (its initiator TransportID and the RELATIVE TARGET PORT
//! IDENTIFIER). A path's own target port comes from its VPD page 0x83
//! (sysfs `vpd_pg83`, no SCSI command), so a registration belongs to a path
//! when its relative target port is the path's (or ALL_TG_PT is set) and,
//! when sysfs names the path's initiator port (Fibre Channel), its
//! TransportID is that port.
//!
//! The keys checked are the one multipathd holds for the map when it holds
//! one, else every key registered through one of the map's paths. A key
//! registered on no usable path is not reported (a PREEMPT or CLEAR from
//! another host removes a key from every path at once: re-registering it
//! would undo a fence).
#![forbid(unsafe_code)]

use std::fmt::Write;

use serde::Serialize;
use serde_json::value::RawValue;

use crate::report::{self, Key, PrinJson};
use reservd_proto::cdb::prin_sa;
use reservd_proto::prin::{self, FullStatusDescriptor};

/// What was read through one path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PathRead {
    /// READ KEYS, READ RESERVATION and READ FULL STATUS data.
    pub read_keys: Vec<u8>,
    pub read_reservation: Vec<u8>,
    pub full_status: Vec<u8>,
}

/// One path of a map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathState {
    /// Kernel name, e.g. `sda`.
    pub name: String,
    /// `major:minor`.
    pub devno: String,
    /// sysfs `device/state` (`running`, `offline`, ...).
    pub sysfs_state: Option<String>,
    /// multipathd's view: dm state, checker state, device state.
    pub multipathd: Option<String>,
    /// The path's relative target port (VPD page 0x83).
    pub target_port: Option<u16>,
    /// The path's initiator port, as a TransportID would name it, when known.
    pub initiator: Option<Vec<u8>>,
    /// What the path answered, or why it could not be read.
    pub read: Result<PathRead, String>,
}

impl PathState {
    /// Whether the path can carry I/O: sysfs says running and multipathd
    /// does not call it failed or faulty.
    pub fn usable(&self) -> bool {
        let sysfs_ok = self.sysfs_state.as_deref().is_none_or(|s| s == "running");
        let mpd_ok = self.multipathd.as_deref().is_none_or(|s| {
            !s.split_whitespace()
                .any(|w| matches!(w, "failed" | "faulty" | "offline" | "shaky"))
        });
        sysfs_ok && mpd_ok
    }

    /// The registrations made through this path's I_T nexus, or why they
    /// cannot be told.
    pub fn own_keys(&self) -> Result<Vec<u64>, String> {
        let read = self.read.as_ref().map_err(Clone::clone)?;
        let Some(port) = self.target_port else {
            return Err("its relative target port is unknown (no VPD page 0x83)".into());
        };
        let (_, descs) = prin::parse_read_full_status(&read.full_status)
            .map_err(|_| "READ FULL STATUS data is truncated".to_string())?;
        let mut keys: Vec<u64> = descs
            .iter()
            .filter(|d| belongs_to(d, port, self.initiator.as_deref()))
            .map(|d| d.key)
            .collect();
        keys.sort_unstable();
        keys.dedup();
        Ok(keys)
    }
}

/// Whether registration `d` was made through the nexus (`initiator` when
/// known, target port `port`).
pub fn belongs_to(d: &FullStatusDescriptor, port: u16, initiator: Option<&[u8]>) -> bool {
    let port_ok = d.all_tg_pt || d.relative_target_port == port;
    let init_ok = initiator.is_none_or(|i| transport_id_names(&d.transport_id, i));
    port_ok && init_ok
}

/// Whether TransportID `tid` names the port whose identifier is `id` (an
/// 8-byte FC N_Port name or SAS address).
fn transport_id_names(tid: &[u8], id: &[u8]) -> bool {
    match tid.first().map(|b| b & 0x0f) {
        // FC: N_PORT NAME at bytes 8..16; SAS: address at 4..12.
        Some(0x0) => tid.get(8..16) == Some(id),
        Some(0x6) => tid.get(4..12) == Some(id),
        _ => false,
    }
}

/// The RELATIVE TARGET PORT IDENTIFIER in VPD page 0x83 data (designator
/// type 4, association "target port").
pub fn vpd83_relative_target_port(page: &[u8]) -> Option<u16> {
    if page.len() < 4 || page[1] != 0x83 {
        return None;
    }
    let end = (4 + u16::from_be_bytes([page[2], page[3]]) as usize).min(page.len());
    let mut at = 4;
    while at + 4 <= end {
        let assoc = (page[at + 1] >> 4) & 0x3;
        let ty = page[at + 1] & 0x0f;
        let len = page[at + 3] as usize;
        let body = page.get(at + 4..at + 4 + len)?;
        if ty == 4 && assoc == 1 && len >= 4 {
            return Some(u16::from_be_bytes([body[2], body[3]]));
        }
        at += 4 + len;
    }
    None
}

/// Parse an FC port name as sysfs shows it (`0x500140500000a001`).
pub fn parse_port_name(s: &str) -> Option<Vec<u8>> {
    let h = s.trim().trim_start_matches("0x");
    u64::from_str_radix(h, 16)
        .ok()
        .map(|v| v.to_be_bytes().to_vec())
}

/// multipathd's `getprkey` reply: `Some(key)`, or None for "none".
pub fn parse_getprkey(reply: &str) -> Result<Option<u64>, String> {
    let r = reply.trim();
    if r == "none" {
        return Ok(None);
    }
    let k = r.split(':').next().unwrap_or("");
    let h = k.strip_prefix("0x").unwrap_or(k);
    u64::from_str_radix(h, 16)
        .map(Some)
        .map_err(|_| format!("unexpected getprkey reply '{r}'"))
}

/// Lines of `show paths raw format "%d %t %T %o"`: device name to
/// "dm-state checker-state device-state".
pub fn parse_show_paths(reply: &str) -> Vec<(String, String)> {
    reply
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let dev = w.next()?;
            if dev == "dev" {
                return None;
            }
            let rest: Vec<&str> = w.collect();
            (!rest.is_empty()).then(|| (dev.to_string(), rest.join(" ")))
        })
        .collect()
}

/// Everything `reservdctl status` shows about one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapStatus {
    /// The device as given.
    pub device: String,
    /// The map's name (None for a plain disk).
    pub map: Option<String>,
    /// `dm-N`, or the disk's name.
    pub kernel_name: String,
    pub wwid: Option<String>,
    pub paths: Vec<PathState>,
    /// Whether multipathd answered, or why not.
    pub multipathd: Result<(), String>,
    /// The key multipathd holds for the map (`getprkey`): Ok(None) when it
    /// holds none.
    pub multipathd_key: Option<Result<Option<u64>, String>>,
}

/// One path lacking one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missing {
    pub path: String,
    pub key: u64,
}

/// The outcome of the check.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// The keys compared across paths.
    pub keys: Vec<u64>,
    pub missing: Vec<Missing>,
    /// Usable paths whose registrations could not be told, and why.
    pub unknown: Vec<(String, String)>,
    /// Paths not counted (offline, failed).
    pub skipped: Vec<String>,
}

impl Verdict {
    pub fn consistent(&self) -> bool {
        self.missing.is_empty() && self.unknown.is_empty()
    }

    /// Paths lacking `key`.
    pub fn lacking(&self, key: u64) -> Vec<&str> {
        self.missing
            .iter()
            .filter(|m| m.key == key)
            .map(|m| m.path.as_str())
            .collect()
    }
}

/// Compare the paths' registrations.
pub fn verdict(s: &MapStatus) -> Verdict {
    let mut v = Verdict::default();
    let mut own: Vec<(&str, Vec<u64>)> = Vec::new();
    for p in &s.paths {
        if !p.usable() {
            v.skipped.push(p.name.clone());
            continue;
        }
        match p.own_keys() {
            Ok(k) => own.push((&p.name, k)),
            Err(e) => v.unknown.push((p.name.clone(), e)),
        }
    }
    let mut candidates: Vec<u64> = match &s.multipathd_key {
        Some(Ok(Some(k))) => vec![*k],
        _ => own.iter().flat_map(|(_, k)| k.iter().copied()).collect(),
    };
    candidates.sort_unstable();
    candidates.dedup();
    // Only keys present on at least one usable path.
    candidates.retain(|k| own.iter().any(|(_, ks)| ks.contains(k)));
    for &k in &candidates {
        for (name, ks) in &own {
            if !ks.contains(&k) {
                v.missing.push(Missing {
                    path: name.to_string(),
                    key: k,
                });
            }
        }
    }
    v.keys = candidates;
    v
}

fn keys_text(keys: &[u64]) -> String {
    if keys.is_empty() {
        return "none".into();
    }
    keys.iter()
        .map(|k| format!("0x{k:x}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The human report, in the manner of sg_persist.
pub fn text(s: &MapStatus, v: &Verdict) -> String {
    let mut o = String::new();
    match &s.map {
        Some(m) => {
            let _ = writeln!(
                o,
                "{}: multipath map {m} ({}), WWID {}",
                s.device,
                s.kernel_name,
                s.wwid.as_deref().unwrap_or("unknown")
            );
        }
        None => {
            let _ = writeln!(
                o,
                "{}: SCSI disk {} (not multipath), WWID {}",
                s.device,
                s.kernel_name,
                s.wwid.as_deref().unwrap_or("unknown")
            );
        }
    }
    match (&s.multipathd, &s.multipathd_key) {
        (Err(e), _) => {
            let _ = writeln!(o, "  multipathd: not reachable ({e})");
        }
        (Ok(()), Some(Ok(Some(k)))) => {
            let _ = writeln!(o, "  multipathd: key for this map 0x{k:x}");
        }
        (Ok(()), Some(Ok(None))) => {
            let _ = writeln!(o, "  multipathd: holds no key for this map");
        }
        (Ok(()), Some(Err(e))) => {
            let _ = writeln!(o, "  multipathd: getprkey failed: {e}");
        }
        (Ok(()), None) => {}
    }
    for p in &s.paths {
        let _ = writeln!(
            o,
            "  path {} ({}): state {}{}{}{}",
            p.name,
            p.devno,
            p.sysfs_state.as_deref().unwrap_or("unknown"),
            p.multipathd
                .as_deref()
                .map(|m| format!(", multipathd {m}"))
                .unwrap_or_default(),
            p.target_port
                .map(|t| format!(", relative target port 0x{t:x}"))
                .unwrap_or_default(),
            if p.usable() { "" } else { " (not usable)" }
        );
        match &p.read {
            Err(e) => {
                let _ = writeln!(o, "    cannot read: {e}");
            }
            Ok(r) => {
                for (sa, data) in [
                    (prin_sa::READ_KEYS, &r.read_keys),
                    (prin_sa::READ_RESERVATION, &r.read_reservation),
                ] {
                    match report::prin_text(sa, data) {
                        Ok(t) => {
                            for l in t.lines() {
                                let _ = writeln!(o, "  {l}");
                            }
                        }
                        Err(_) => {
                            let _ = writeln!(o, "    truncated data");
                        }
                    }
                }
                match p.own_keys() {
                    Ok(k) => {
                        let _ = writeln!(o, "    registered through this path: {}", keys_text(&k));
                    }
                    Err(e) => {
                        let _ = writeln!(o, "    registrations of this path unknown: {e}");
                    }
                }
            }
        }
    }
    if v.consistent() {
        let n = s.paths.len() - v.skipped.len();
        let _ = writeln!(
            o,
            "Verdict: consistent: {} on all {n} usable path(s){}",
            if v.keys.is_empty() {
                "no key registered".to_string()
            } else {
                format!("key(s) {} registered", keys_text(&v.keys))
            },
            if v.skipped.is_empty() {
                String::new()
            } else {
                format!(" (not counted: {})", v.skipped.join(", "))
            }
        );
    } else {
        let _ = writeln!(o, "Verdict: INCONSISTENT");
        for m in &v.missing {
            let _ = writeln!(o, "  path {} lacks key 0x{:x}", m.path, m.key);
        }
        for (p, e) in &v.unknown {
            let _ = writeln!(o, "  path {p}: cannot tell its registrations: {e}");
        }
        if !v.skipped.is_empty() {
            let _ = writeln!(o, "  not counted (not usable): {}", v.skipped.join(", "));
        }
    }
    o
}

/// `reservdctl status --json`: the whole view, in this field order.
#[derive(Serialize)]
struct StatusJson<'a> {
    device: &'a str,
    map: Option<&'a str>,
    kernel_name: &'a str,
    wwid: Option<&'a str>,
    /// `true`, or why multipathd could not be asked.
    multipathd: Reachable<'a>,
    multipathd_key: Option<Key>,
    paths: Vec<PathJson<'a>>,
    verdict: VerdictJson<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Reachable<'a> {
    Yes(bool),
    No(&'a str),
}

#[derive(Serialize)]
struct PathJson<'a> {
    name: &'a str,
    devno: &'a str,
    state: Option<&'a str>,
    multipathd: Option<&'a str>,
    relative_target_port: Option<u16>,
    usable: bool,
    read_keys: Option<PrinJson>,
    read_reservation: Option<PrinJson>,
    error: Option<&'a str>,
    own_keys: Option<Vec<Key>>,
}

#[derive(Serialize)]
struct VerdictJson<'a> {
    consistent: bool,
    keys: Vec<Key>,
    missing: Vec<MissingJson<'a>>,
    unknown: Vec<UnknownJson<'a>>,
    not_counted: &'a [String],
}

#[derive(Serialize)]
struct MissingJson<'a> {
    path: &'a str,
    key: Key,
}

#[derive(Serialize)]
struct UnknownJson<'a> {
    path: &'a str,
    reason: &'a str,
}

fn keys(ks: &[u64]) -> Vec<Key> {
    ks.iter().copied().map(Key).collect()
}

/// The JSON report.
pub fn json(s: &MapStatus, v: &Verdict) -> String {
    let paths = s
        .paths
        .iter()
        .map(|p| {
            let (read_keys, read_reservation, error) = match &p.read {
                Ok(r) => (
                    report::prin_json(prin_sa::READ_KEYS, &r.read_keys).ok(),
                    report::prin_json(prin_sa::READ_RESERVATION, &r.read_reservation).ok(),
                    None,
                ),
                Err(e) => (None, None, Some(e.as_str())),
            };
            PathJson {
                name: &p.name,
                devno: &p.devno,
                state: p.sysfs_state.as_deref(),
                multipathd: p.multipathd.as_deref(),
                relative_target_port: p.target_port,
                usable: p.usable(),
                read_keys,
                read_reservation,
                error,
                own_keys: p.own_keys().ok().map(|k| keys(&k)),
            }
        })
        .collect();
    let doc = StatusJson {
        device: &s.device,
        map: s.map.as_deref(),
        kernel_name: &s.kernel_name,
        wwid: s.wwid.as_deref(),
        multipathd: match &s.multipathd {
            Ok(()) => Reachable::Yes(true),
            Err(e) => Reachable::No(e),
        },
        multipathd_key: match &s.multipathd_key {
            Some(Ok(Some(k))) => Some(Key(*k)),
            _ => None,
        },
        paths,
        verdict: VerdictJson {
            consistent: v.consistent(),
            keys: keys(&v.keys),
            missing: v
                .missing
                .iter()
                .map(|m| MissingJson {
                    path: &m.path,
                    key: Key(m.key),
                })
                .collect(),
            unknown: v
                .unknown
                .iter()
                .map(|(p, e)| UnknownJson { path: p, reason: e })
                .collect(),
            not_counted: &v.skipped,
        },
    };
    serde_json::to_string(&doc).expect("the report serializes")
}

/// What `reservdctl status --repair` does for a key a path lacks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepairPlan {
    /// The map's node, e.g. `/dev/mapper/mpatha`.
    pub map_dev: String,
    pub key: u64,
    pub aptpl: bool,
    /// The paths that lacked the key.
    pub paths: Vec<String>,
}

/// `status --repair --json`: one document with the status before, the
/// repair done (`{"needed":false}` when no path lacked a key) and the
/// status after (`null` when nothing was done). `before` and `after` are
/// [`json`] documents.
pub fn repair_json(before: &str, plan: Option<&RepairPlan>, after: Option<&str>) -> String {
    #[derive(Serialize)]
    struct Doc<'a> {
        before: &'a RawValue,
        repair: Repair<'a>,
        after: Option<&'a RawValue>,
    }
    #[derive(Serialize)]
    struct Repair<'a> {
        needed: bool,
        #[serde(flatten)]
        plan: Option<PlanJson<'a>>,
    }
    #[derive(Serialize)]
    struct PlanJson<'a> {
        map: &'a str,
        key: Key,
        aptpl: bool,
        paths: &'a [String],
    }
    fn raw(d: &str) -> &RawValue {
        serde_json::from_str(d).expect("a status document is JSON")
    }
    let doc = Doc {
        before: raw(before),
        repair: Repair {
            needed: plan.is_some(),
            plan: plan.map(|p| PlanJson {
                map: &p.map_dev,
                key: Key(p.key),
                aptpl: p.aptpl,
                paths: &p.paths,
            }),
        },
        after: after.map(raw),
    };
    serde_json::to_string(&doc).expect("the repair document serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// READ FULL STATUS data: (key, relative target port, SAS address).
    fn full_status(regs: &[(u64, u16, u64)]) -> Vec<u8> {
        let mut body = Vec::new();
        for &(k, port, sas) in regs {
            let mut d = vec![0u8; 24];
            d[0..8].copy_from_slice(&k.to_be_bytes());
            d[18..20].copy_from_slice(&port.to_be_bytes());
            let mut tid = vec![0u8; 24];
            tid[0] = 0x06;
            tid[4..12].copy_from_slice(&sas.to_be_bytes());
            d[20..24].copy_from_slice(&(tid.len() as u32).to_be_bytes());
            d.extend_from_slice(&tid);
            body.extend_from_slice(&d);
        }
        let mut out = vec![0, 0, 0, 7];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn path(name: &str, port: u16, regs: &[(u64, u16, u64)]) -> PathState {
        PathState {
            name: name.into(),
            devno: "8:0".into(),
            sysfs_state: Some("running".into()),
            multipathd: Some("active ready running".into()),
            target_port: Some(port),
            initiator: None,
            read: Ok(PathRead {
                read_keys: prin::read_keys(7, &regs.iter().map(|r| r.0).collect::<Vec<_>>()),
                read_reservation: prin::read_reservation(7, None),
                full_status: full_status(regs),
            }),
        }
    }

    fn map(paths: Vec<PathState>, key: Option<u64>) -> MapStatus {
        MapStatus {
            device: "/dev/mapper/mpatha".into(),
            map: Some("mpatha".into()),
            kernel_name: "dm-0".into(),
            wwid: Some("36001405".into()),
            paths,
            multipathd: Ok(()),
            multipathd_key: Some(Ok(key)),
        }
    }

    #[test]
    fn both_paths_registered_is_consistent() {
        let regs = [(0x1234, 1, 0xa001), (0x1234, 2, 0xa002)];
        let s = map(
            vec![path("sda", 1, &regs), path("sdb", 2, &regs)],
            Some(0x1234),
        );
        let v = verdict(&s);
        assert!(v.consistent(), "{v:?}");
        assert_eq!(v.keys, vec![0x1234]);
        let t = text(&s, &v);
        assert!(t.contains("Verdict: consistent: key(s) 0x1234 registered on all 2 usable path(s)"));
        assert!(t.contains("multipathd: key for this map 0x1234"), "{t}");
        assert!(t.contains("2 registered reservation key(s) follow"), "{t}");
    }

    #[test]
    fn a_path_without_its_registration_is_named() {
        // The registration through port 2 is gone; READ KEYS from either
        // path lists the LU's single remaining registration.
        let regs = [(0x1234, 1, 0xa001)];
        let s = map(
            vec![path("sda", 1, &regs), path("sdb", 2, &regs)],
            Some(0x1234),
        );
        let v = verdict(&s);
        assert!(!v.consistent());
        assert_eq!(
            v.missing,
            vec![Missing {
                path: "sdb".into(),
                key: 0x1234
            }]
        );
        assert_eq!(v.lacking(0x1234), vec!["sdb"]);
        let t = text(&s, &v);
        assert!(
            t.contains("Verdict: INCONSISTENT\n  path sdb lacks key 0x1234"),
            "{t}"
        );
        let j = json(&s, &v);
        assert!(
            j.contains(r#""verdict":{"consistent":false,"keys":["0x1234"],"missing":[{"path":"sdb","key":"0x1234"}]"#),
            "{j}"
        );
    }

    #[test]
    fn offline_paths_are_not_counted() {
        let regs = [(0x1234, 1, 0xa001)];
        let mut p2 = path("sdb", 2, &regs);
        p2.sysfs_state = Some("offline".into());
        p2.read = Err("I/O error".into());
        let s = map(vec![path("sda", 1, &regs), p2], Some(0x1234));
        let v = verdict(&s);
        assert!(v.consistent(), "{v:?}");
        assert_eq!(v.skipped, vec!["sdb"]);
        let mut p2 = path("sdb", 2, &regs);
        p2.multipathd = Some("failed faulty running".into());
        assert!(!p2.usable());
    }

    #[test]
    fn keys_on_no_path_are_left_alone_and_other_keys_count_without_multipathd() {
        // multipathd holds a key no path has (preempted): nothing to repair.
        let regs = [(0x99, 1, 0xb001)];
        let s = map(
            vec![path("sda", 1, &regs), path("sdb", 2, &regs)],
            Some(0x1234),
        );
        let v = verdict(&s);
        assert!(v.consistent() && v.keys.is_empty(), "{v:?}");
        // Without a multipathd key every key counts.
        let s = map(vec![path("sda", 1, &regs), path("sdb", 2, &regs)], None);
        assert_eq!(verdict(&s).lacking(0x99), vec!["sdb"]);
    }

    #[test]
    fn unreadable_usable_path_is_not_consistent() {
        let regs = [(0x1, 1, 0xa001), (0x1, 2, 0xa002)];
        let mut p2 = path("sdb", 2, &regs);
        p2.target_port = None;
        let s = map(vec![path("sda", 1, &regs), p2], Some(1));
        let v = verdict(&s);
        assert!(!v.consistent());
        assert_eq!(v.unknown[0].0, "sdb");
    }

    #[test]
    fn all_target_ports_and_initiators() {
        let d = FullStatusDescriptor {
            key: 1,
            all_tg_pt: true,
            reservation_holder: false,
            scope: 0,
            pr_type: 0,
            relative_target_port: 0,
            transport_id: {
                let mut t = vec![0u8; 24];
                t[8..16].copy_from_slice(&0x2100_0024_ff00_0001u64.to_be_bytes());
                t
            },
        };
        assert!(belongs_to(&d, 5, None));
        let mine = parse_port_name("0x21000024ff000001\n").unwrap();
        let other = parse_port_name("0x21000024ff000002").unwrap();
        assert!(belongs_to(&d, 5, Some(&mine)));
        assert!(!belongs_to(&d, 5, Some(&other)));
    }

    #[test]
    fn vpd83_target_port() {
        // NAA designator, then relative target port 2 (assoc 1, type 4),
        // as LIO sends them.
        let mut p = vec![0x00, 0x83, 0, 0];
        p.extend_from_slice(&[0x01, 0x03, 0x00, 0x08, 1, 2, 3, 4, 5, 6, 7, 8]);
        p.extend_from_slice(&[0x61, 0x94, 0x00, 0x04, 0, 0, 0, 2]);
        let n = (p.len() - 4) as u16;
        p[2..4].copy_from_slice(&n.to_be_bytes());
        assert_eq!(vpd83_relative_target_port(&p), Some(2));
        // Association "logical unit" does not count; truncated pages fail.
        let mut q = p.clone();
        q[17] = 0x04;
        assert_eq!(vpd83_relative_target_port(&q), None);
        assert_eq!(vpd83_relative_target_port(&p[..18]), None);
        assert_eq!(vpd83_relative_target_port(&[0, 0x80, 0, 0]), None);
    }

    #[test]
    fn multipathd_replies() {
        assert_eq!(parse_getprkey("0x1234\n"), Ok(Some(0x1234)));
        assert_eq!(parse_getprkey("0xabc:aptpl\n"), Ok(Some(0xabc)));
        assert_eq!(parse_getprkey("none\n"), Ok(None));
        assert!(parse_getprkey("fail\n").is_err());
        assert_eq!(
            parse_show_paths(
                "dev dm_st chk_st dev_st\nsda active ready running\nsdb failed faulty offline\n"
            ),
            vec![
                ("sda".to_string(), "active ready running".to_string()),
                ("sdb".to_string(), "failed faulty offline".to_string())
            ]
        );
    }
    #[test]
    fn repair_json_wraps_both_statuses_and_the_plan() {
        let plan = RepairPlan {
            map_dev: "/dev/mapper/mpatha".into(),
            key: 0xabc,
            aptpl: true,
            paths: vec!["sdb".into(), "sd\"x".into()],
        };
        assert_eq!(
            repair_json("{\"a\":1}", Some(&plan), Some("{\"b\":2}")),
            "{\"before\":{\"a\":1},\"repair\":{\"needed\":true,\"map\":\"/dev/mapper/mpatha\",\
             \"key\":\"0xabc\",\"aptpl\":true,\"paths\":[\"sdb\",\"sd\\\"x\"]},\"after\":{\"b\":2}}"
        );
        assert_eq!(
            repair_json("{}", None, None),
            "{\"before\":{},\"repair\":{\"needed\":false},\"after\":null}"
        );
    }
}
