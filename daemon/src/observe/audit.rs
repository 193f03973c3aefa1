//! The audit trail: one record per PERSISTENT RESERVE OUT (and CLEANUP)
//! that reservd executes, whatever the backend.
//!
//! [`Audited`] wraps the backend reservd serves with. After each PR OUT it
//! writes one record on the log target [`AUDIT_TARGET`], which is enabled
//! at info level by default (`-q` silences it, `RUST_LOG` can too). The
//! record names the device (major:minor, and the WWID and map name, read
//! from sysfs: no extra SCSI command), the service action and type, the
//! RESERVATION KEY and SERVICE ACTION RESERVATION KEY as the client gave
//! them (never the rest of the parameter list), the answer's status and
//! sense, the backend that ran it and the client's pid and uid.
//!
//! When stderr is the systemd journal, the record goes to the journal's
//! native socket instead, with structured fields (`RESERVD_DEVICE`,
//! `RESERVD_WWID`, `RESERVD_MAP`, `RESERVD_SA`, `RESERVD_TYPE`,
//! `RESERVD_KEY`, `RESERVD_SA_KEY`, `RESERVD_STATUS`, `RESERVD_SENSE`,
//! `RESERVD_BACKEND`, `RESERVD_PEER_PID`, `RESERVD_PEER_UID`), so that
//! `journalctl RESERVD_WWID=...` finds every change to one LU. If the
//! journal cannot be reached the text line is logged as usual.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::journal::{put_journal_field, send_journal, stderr_is_journal, JOURNAL_SOCKET};
use super::logging::AUDIT_TARGET;
use crate::backend::{BackendError, Command, Nexus, Peer, PrBackend};
use reservd_proto::cdb::{prout_sa, PERSISTENT_RESERVE_OUT};
use reservd_proto::sense::{Answer, SenseCode, Status};
use reservd_proto::wire::OP_CLEANUP;

/// What the device behind a client's fd is, as far as sysfs tells.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// "major:minor", or "-" when the fd is not a device.
    pub dev: String,
    pub wwid: Option<String>,
    /// The device-mapper name of a map.
    pub map: Option<String>,
    /// Whether the device is a dm-multipath map (dm uuid `mpath-...`).
    pub multipath: bool,
}

/// One audit record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub device: DeviceInfo,
    /// The service action, or None for CLEANUP.
    pub service_action: Option<u8>,
    pub pr_type: u8,
    /// RESERVATION KEY and SERVICE ACTION RESERVATION KEY, when the
    /// parameter list holds them.
    pub key: Option<u64>,
    pub sa_key: Option<u64>,
    /// The answer's status and sense code, or why there was no answer
    /// (the connection was closed).
    pub answer: Result<(Status, Option<SenseCode>), String>,
    pub backend: &'static str,
    pub peer: Option<Peer>,
}

fn opt_hex(k: Option<u64>) -> String {
    k.map_or_else(|| "-".to_string(), |k| format!("{k:#x}"))
}

impl Record {
    /// Build the record of `cmd` and its result (no I/O but `device`).
    pub fn new(
        cmd: &Command<'_>,
        device: DeviceInfo,
        backend: &'static str,
        result: &Result<Answer, BackendError>,
    ) -> Record {
        let (service_action, pr_type) = if cmd.cdb[0] == OP_CLEANUP {
            (None, 0)
        } else {
            (Some(cmd.cdb[1] & 0x1f), cmd.cdb[2] & 0x0f)
        };
        let word = |at: usize| {
            service_action?;
            cmd.params
                .get(at..at + 8)
                .map(|b| u64::from_be_bytes(b.try_into().unwrap()))
        };
        Record {
            device,
            service_action,
            pr_type,
            key: word(0),
            sa_key: word(8),
            answer: match result {
                Ok(a) => Ok((a.status, a.sense_code())),
                Err(e) => Err(e.to_string()),
            },
            backend,
            peer: cmd.peer,
        }
    }

    pub fn sa_name(&self) -> &'static str {
        self.service_action.map_or("CLEANUP", prout_sa::name)
    }

    pub fn status_text(&self) -> String {
        match &self.answer {
            Ok((s, _)) => s.name().replace(' ', "_"),
            Err(_) => "CONNECTION_CLOSED".to_string(),
        }
    }

    pub fn sense_text(&self) -> String {
        match &self.answer {
            Ok((_, Some(c))) => format!("{:02x}/{:02x}/{:02x}", c.key, c.asc, c.ascq),
            Ok((_, None)) => "-".to_string(),
            Err(e) => e.clone(),
        }
    }

    /// The structured fields, in order; absent values are "-".
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        let d = &self.device;
        vec![
            ("RESERVD_DEVICE", d.dev.clone()),
            ("RESERVD_WWID", d.wwid.clone().unwrap_or_else(|| "-".into())),
            ("RESERVD_MAP", d.map.clone().unwrap_or_else(|| "-".into())),
            ("RESERVD_SA", self.sa_name().to_string()),
            ("RESERVD_TYPE", self.pr_type.to_string()),
            ("RESERVD_KEY", opt_hex(self.key)),
            ("RESERVD_SA_KEY", opt_hex(self.sa_key)),
            ("RESERVD_STATUS", self.status_text()),
            ("RESERVD_SENSE", self.sense_text()),
            ("RESERVD_BACKEND", self.backend.to_string()),
            (
                "RESERVD_PEER_PID",
                self.peer.map_or("-".into(), |p| p.pid.to_string()),
            ),
            (
                "RESERVD_PEER_UID",
                self.peer.map_or("-".into(), |p| p.uid.to_string()),
            ),
        ]
    }

    /// The one-line text form: `PR OUT <SA> device=... key=... status=...`.
    pub fn text(&self) -> String {
        let mut o = format!("PR OUT {}", self.sa_name());
        for (k, v) in self.fields() {
            if k == "RESERVD_SA" {
                continue;
            }
            let name = k.trim_start_matches("RESERVD_").to_ascii_lowercase();
            if v.contains(char::is_whitespace) || v.is_empty() {
                // Quoted as a JSON string.
                let quoted = serde_json::to_string(&v).expect("a string serializes");
                let _ = write!(o, " {name}={quoted}");
            } else {
                let _ = write!(o, " {name}={v}");
            }
        }
        o
    }

    /// The record as one datagram of journald's native protocol.
    pub fn journal_datagram(&self) -> Vec<u8> {
        let mut fields = vec![
            ("MESSAGE", format!("audit: {}", self.text())),
            ("PRIORITY", "6".to_string()),
            ("SYSLOG_IDENTIFIER", "reservd".to_string()),
        ];
        fields.extend(self.fields());
        let mut out = Vec::new();
        for (k, v) in fields {
            put_journal_field(&mut out, k, &v);
        }
        out
    }
}

/// Read what sysfs says about the device behind `fd`.
pub fn device_info(fd: std::os::fd::BorrowedFd<'_>) -> DeviceInfo {
    let Ok(st) = nix::sys::stat::fstat(fd) else {
        return DeviceInfo {
            dev: "-".into(),
            ..Default::default()
        };
    };
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFBLK => "block",
        libc::S_IFCHR => "char",
        _ => {
            return DeviceInfo {
                dev: "-".into(),
                ..Default::default()
            }
        }
    };
    let (maj, min) = (libc::major(st.st_rdev), libc::minor(st.st_rdev));
    device_info_at(Path::new("/sys/dev"), kind, maj, min)
}

/// A sysfs attribute's value without surrounding white space; None when
/// it cannot be read or is empty.
pub fn read_sysfs(path: &Path) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// [`device_info`] below `sys_dev` (normally `/sys/dev`).
pub fn device_info_at(sys_dev: &Path, kind: &str, maj: u32, min: u32) -> DeviceInfo {
    let base = sys_dev.join(kind).join(format!("{maj}:{min}"));
    let read = |rel: &str| read_sysfs(&base.join(rel));
    let mut info = DeviceInfo {
        dev: format!("{maj}:{min}"),
        ..Default::default()
    };
    if let Some(uuid) = read("dm/uuid") {
        info.map = read("dm/name");
        if let Some(w) = uuid.strip_prefix("mpath-") {
            info.multipath = true;
            info.wwid = Some(w.to_string());
        }
    } else {
        info.wwid = read("device/wwid").map(|w| multipath_style_wwid(&w));
    }
    info
}

/// A disk's WWID as multipath writes it, from the kernel's (`device/wwid`),
/// so that an LU's records carry one WWID whether it was reached through
/// a map or on its own: an NAA identifier (`naa.` and hex digits) is `3`
/// and the digits, an EUI-64 one (`eui.`) is `2` and the digits. Any other
/// form (a T10 vendor identification, a SCSI name string) is kept as the
/// kernel gives it.
pub fn multipath_style_wwid(kernel: &str) -> String {
    let hex = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_hexdigit());
    for (prefix, code) in [("naa.", '3'), ("eui.", '2')] {
        if let Some(digits) = kernel.strip_prefix(prefix).filter(|d| hex(d)) {
            return format!("{code}{}", digits.to_ascii_lowercase());
        }
    }
    kernel.to_string()
}

/// A backend that writes an audit record for each PR OUT and CLEANUP it
/// hands to the real backend.
pub struct Audited {
    pub inner: Arc<dyn PrBackend>,
    /// Whether multipath maps go to libmpathpersist (else to SG_IO); asked
    /// after each command (libmpathpersist may still be loading at start).
    pub multipath_active: Box<dyn Fn() -> bool + Send + Sync>,
    /// The journal's native socket, when records go there.
    pub journal: Option<PathBuf>,
    /// Whether records are wanted at all (the audit target is enabled).
    pub enabled: bool,
}

impl Audited {
    /// Wrap `inner` (after the logger is installed: `-q` turns records
    /// off); records go to the journal when stderr is the journal.
    pub fn new(
        multipath_active: impl Fn() -> bool + Send + Sync + 'static,
        inner: Arc<dyn PrBackend>,
    ) -> Audited {
        Audited {
            inner,
            multipath_active: Box::new(multipath_active),
            journal: stderr_is_journal().then(|| PathBuf::from(JOURNAL_SOCKET)),
            enabled: log::log_enabled!(target: AUDIT_TARGET, log::Level::Info),
        }
    }

    fn emit(&self, rec: &Record) {
        if let Some(path) = &self.journal {
            match send_journal(path, &rec.journal_datagram()) {
                Ok(()) => return,
                Err(e) => log::debug!("journal socket {}: {e}", path.display()),
            }
        }
        log::info!(target: AUDIT_TARGET, "audit: {}", rec.text());
    }
}

impl PrBackend for Audited {
    fn execute(&self, cmd: &Command<'_>) -> Result<Answer, BackendError> {
        let op = cmd.cdb[0];
        let audited = op == PERSISTENT_RESERVE_OUT || op == OP_CLEANUP;
        if !audited || !self.enabled {
            return self.inner.execute(cmd);
        }
        let r = self.inner.execute(cmd);
        let device = device_info(cmd.fd);
        let backend = if device.multipath && (self.multipath_active)() {
            "multipath"
        } else {
            "sgio"
        };
        self.emit(&Record::new(cmd, device, backend, &r));
        r
    }

    fn disconnect(&self, nexus: Nexus) {
        self.inner.disconnect(nexus)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reservd_proto::cdb::PrOutCdb;
    use reservd_proto::params::ProutParams;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixDatagram;

    fn mp_device() -> DeviceInfo {
        DeviceInfo {
            dev: "253:0".into(),
            wwid: Some("36001405c0ffee".into()),
            map: Some("mpatha".into()),
            multipath: true,
        }
    }

    fn record(sa: u8, ty: u8, result: Result<Answer, BackendError>) -> Record {
        let f = std::fs::File::open("/dev/null").unwrap();
        let params = ProutParams {
            key: 0x1234,
            sa_key: 0xabcd,
            ..Default::default()
        }
        .encode();
        let cdb = reservd_proto::cdb::pad16(
            &PrOutCdb {
                service_action: sa,
                scope: 0,
                pr_type: ty,
                parameter_list_length: params.len() as u32,
            }
            .encode(),
        );
        let cmd = Command {
            nexus: 1,
            peer: Some(Peer {
                pid: 4242,
                uid: 107,
                gid: 107,
            }),
            fd: f.as_fd(),
            cdb: &cdb,
            params: &params,
        };
        Record::new(&cmd, mp_device(), "multipath", &result)
    }

    #[test]
    fn text_record_has_every_field() {
        let r = record(prout_sa::RESERVE, 5, Ok(Answer::status(Status::GOOD)));
        assert_eq!(
            r.text(),
            "PR OUT RESERVE device=253:0 wwid=36001405c0ffee map=mpatha type=5 key=0x1234 \
             sa_key=0xabcd status=GOOD sense=- backend=multipath peer_pid=4242 peer_uid=107"
        );
        let r = record(
            prout_sa::REGISTER,
            0,
            Ok(Answer::status(Status::RESERVATION_CONFLICT)),
        );
        assert!(r.text().contains("status=RESERVATION_CONFLICT sense=-"));
        let r = record(
            prout_sa::PREEMPT,
            1,
            Ok(Answer::check(SenseCode::INVALID_FIELD)),
        );
        assert!(r
            .text()
            .starts_with("PR OUT PREEMPT device=253:0 wwid=36001405c0ffee"));
        assert!(r.text().contains("status=CHECK_CONDITION sense=05/24/00"));
        let r = record(
            prout_sa::CLEAR,
            0,
            Err(BackendError::Service("multipathd is gone".into())),
        );
        assert!(
            r.text()
                .contains("status=CONNECTION_CLOSED sense=\"multipathd is gone\""),
            "{}",
            r.text()
        );
    }

    #[test]
    fn keys_need_a_parameter_list_and_cleanup_has_no_action() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let cdb = reservd_proto::cdb::pad16(&[OP_CLEANUP]);
        let cmd = Command {
            nexus: 1,
            peer: None,
            fd: f.as_fd(),
            cdb: &cdb,
            params: &[0; 10],
        };
        let r = Record::new(
            &cmd,
            DeviceInfo::default(),
            "sgio",
            &Ok(Answer::status(Status::GOOD)),
        );
        assert_eq!(r.sa_name(), "CLEANUP");
        assert_eq!((r.key, r.sa_key), (None, None));
        assert!(r.text().contains("key=- sa_key=-"));
        assert!(r.text().ends_with("peer_pid=- peer_uid=-"));
    }

    /// A fake journal: the record arrives as one datagram with the
    /// structured fields.
    #[test]
    fn record_is_sent_to_the_journal_socket() {
        let dir = std::env::temp_dir().join(format!("reservd-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("socket");
        let journal = UnixDatagram::bind(&sock).unwrap();
        let rec = record(
            prout_sa::REGISTER_AND_IGNORE,
            0,
            Ok(Answer::status(Status::GOOD)),
        );
        send_journal(&sock, &rec.journal_datagram()).unwrap();
        let mut buf = vec![0u8; 65536];
        let n = journal.recv(&mut buf).unwrap();
        let fields = super::super::journal::parse_datagram(&buf[..n]);
        let get = |k: &str| {
            fields
                .iter()
                .find(|(f, _)| f == k)
                .map(|(_, v)| v.as_str())
                .unwrap_or_else(|| panic!("no {k} in {fields:?}"))
        };
        assert_eq!(get("PRIORITY"), "6");
        assert_eq!(get("SYSLOG_IDENTIFIER"), "reservd");
        assert!(get("MESSAGE").starts_with("audit: PR OUT REGISTER_AND_IGNORE device=253:0"));
        assert_eq!(get("RESERVD_DEVICE"), "253:0");
        assert_eq!(get("RESERVD_WWID"), "36001405c0ffee");
        assert_eq!(get("RESERVD_MAP"), "mpatha");
        assert_eq!(get("RESERVD_SA"), "REGISTER_AND_IGNORE");
        assert_eq!(get("RESERVD_TYPE"), "0");
        assert_eq!(get("RESERVD_KEY"), "0x1234");
        assert_eq!(get("RESERVD_SA_KEY"), "0xabcd");
        assert_eq!(get("RESERVD_STATUS"), "GOOD");
        assert_eq!(get("RESERVD_SENSE"), "-");
        assert_eq!(get("RESERVD_PEER_PID"), "4242");
        assert_eq!(get("RESERVD_PEER_UID"), "107");
        // Without a listener the send fails, so the text line is used.
        drop(journal);
        std::fs::remove_file(&sock).unwrap();
        assert!(send_journal(&sock, b"MESSAGE=x\n").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Answers GOOD to everything.
    struct Good;
    impl PrBackend for Good {
        fn execute(&self, _: &Command<'_>) -> Result<Answer, BackendError> {
            Ok(Answer::status(Status::GOOD))
        }
    }

    #[test]
    fn the_wrapper_sends_one_datagram_per_pr_out_only() {
        let dir = std::env::temp_dir().join(format!("reservd-audited-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("socket");
        let journal = UnixDatagram::bind(&sock).unwrap();
        journal.set_nonblocking(true).unwrap();
        let a = Audited {
            inner: Arc::new(Good),
            multipath_active: Box::new(|| true),
            journal: Some(sock.clone()),
            enabled: true,
        };
        let f = std::fs::File::open("/dev/null").unwrap();
        let params = ProutParams {
            key: 0x77,
            ..Default::default()
        }
        .encode();
        let prout = reservd_proto::cdb::pad16(
            &PrOutCdb {
                service_action: prout_sa::RELEASE,
                scope: 0,
                pr_type: 3,
                parameter_list_length: 24,
            }
            .encode(),
        );
        let prin = reservd_proto::cdb::pad16(
            &reservd_proto::cdb::PrInCdb {
                service_action: 0,
                allocation_length: 8192,
            }
            .encode(),
        );
        for cdb in [&prin, &prout, &prin] {
            let cmd = Command {
                nexus: 1,
                peer: None,
                fd: f.as_fd(),
                cdb,
                params: if cdb[0] == PERSISTENT_RESERVE_OUT {
                    &params
                } else {
                    &[]
                },
            };
            assert_eq!(a.execute(&cmd).unwrap(), Answer::status(Status::GOOD));
        }
        let mut buf = vec![0u8; 65536];
        let n = journal.recv(&mut buf).unwrap();
        let fields = super::super::journal::parse_datagram(&buf[..n]);
        assert!(fields.contains(&("RESERVD_SA".into(), "RELEASE".into())));
        assert!(fields.contains(&("RESERVD_TYPE".into(), "3".into())));
        assert!(fields.contains(&("RESERVD_KEY".into(), "0x77".into())));
        // /dev/null is no SCSI device: no WWID, SG_IO backend.
        assert!(fields.contains(&("RESERVD_DEVICE".into(), "1:3".into())));
        assert!(fields.contains(&("RESERVD_BACKEND".into(), "sgio".into())));
        assert!(journal.recv(&mut buf).is_err(), "only one record");
        // Disabled (-q): nothing.
        let quiet = Audited {
            enabled: false,
            ..a
        };
        let cmd = Command {
            nexus: 1,
            peer: None,
            fd: f.as_fd(),
            cdb: &prout,
            params: &params,
        };
        quiet.execute(&cmd).unwrap();
        assert!(journal.recv(&mut buf).is_err(), "a record while disabled");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_disks_wwid_is_written_as_multipath_writes_it() {
        for (kernel, want) in [
            (
                "naa.6001405c0ffee000000000000000b001",
                "36001405c0ffee000000000000000b001",
            ),
            ("naa.5000C500A1B2C3D4", "35000c500a1b2c3d4"),
            ("eui.0025385b71b0a2c4", "20025385b71b0a2c4"),
            // Not hex digits after the prefix: a SCSI name string, kept.
            ("naa.iqn-like name", "naa.iqn-like name"),
            ("naa.", "naa."),
            (
                "t10.ATA     QEMU HARDDISK   QM00001",
                "t10.ATA     QEMU HARDDISK   QM00001",
            ),
            (
                "iqn.2003-01.org.linux-iscsi:lun0",
                "iqn.2003-01.org.linux-iscsi:lun0",
            ),
        ] {
            assert_eq!(multipath_style_wwid(kernel), want, "{kernel}");
        }
    }

    #[test]
    fn sysfs_device_info() {
        let root = std::env::temp_dir().join(format!("reservd-sysdev-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let map = root.join("block/253:0/dm");
        std::fs::create_dir_all(&map).unwrap();
        std::fs::write(map.join("uuid"), "mpath-3600140512\n").unwrap();
        std::fs::write(map.join("name"), "mpatha\n").unwrap();
        let disk = root.join("block/8:16/device");
        std::fs::create_dir_all(&disk).unwrap();
        std::fs::write(disk.join("wwid"), "naa.600140512\n").unwrap();
        let lv = root.join("block/253:1/dm");
        std::fs::create_dir_all(&lv).unwrap();
        std::fs::write(lv.join("uuid"), "LVM-abc\n").unwrap();
        std::fs::write(lv.join("name"), "vg-lv\n").unwrap();
        assert_eq!(device_info_at(&root, "block", 253, 0), {
            DeviceInfo {
                dev: "253:0".into(),
                wwid: Some("3600140512".into()),
                map: Some("mpatha".into()),
                multipath: true,
            }
        });
        let d = device_info_at(&root, "block", 8, 16);
        assert_eq!(d.wwid.as_deref(), Some("3600140512"));
        assert!(!d.multipath && d.map.is_none());
        let d = device_info_at(&root, "block", 253, 1);
        assert!(!d.multipath && d.wwid.is_none());
        assert_eq!(d.map.as_deref(), Some("vg-lv"));
        assert_eq!(device_info_at(&root, "block", 9, 9).dev, "9:9");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
