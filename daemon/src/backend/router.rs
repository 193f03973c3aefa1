//! Routing: each command goes to libmpathpersist when its fd is a
//! dm-multipath map, to SG_IO otherwise.
//!
//! [`MultipathSupport::detect`] decides at start-up whether multipath
//! support is active: it needs a usable `/dev/mapper/control` and
//! `libmpathpersist.so.0`. Without either, reservd serves every device
//! through SG_IO (multipath maps included, on one path only) and says so in
//! its start-up line.
//!
//! On a multipath map ([`Multipath`]):
//! - PR IN READ KEYS, READ RESERVATION, REPORT CAPABILITIES and READ FULL
//!   STATUS run through `mpath_persistent_reserve_in` and are translated
//!   back to SPC-4 data (see [`crate::mpath_xlate`]);
//! - PR OUT service actions 0..=6 run through
//!   `mpath_persistent_reserve_out`;
//! - failures are mapped by [`crate::sense::failure_answer`]; for the four
//!   classes whose sense the library drops, a TEST UNIT READY on the map
//!   recovers it (see [`crate::sense::mpath_wants_tur`]);
//! - CLEANUP (opcode 0xFF, only when enabled) clears the map's key and
//!   registered flag in multipathd over one connection, then unregisters
//!   the I_T nexuses with REGISTER AND IGNORE EXISTING KEY and a zero key.
//!   If multipathd cannot be reached or refuses, the client's connection is
//!   closed (no answer), as proposed upstream.

use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use super::dm::{DmControl, MapKind};
use super::mpath::{Libmpathpersist, PersistLib};
use super::sgio::{sg_io, SgIo, Transfer};
use super::{BackendError, Command, PrBackend};
use crate::cdb::{PERSISTENT_RESERVE_IN, PERSISTENT_RESERVE_OUT};
use crate::mpath_xlate::{
    prin_data, prin_service_action, prout_request, FullStatusError, ProutRequest,
};
use crate::multipathd::{clear_map_keys, Multipathd};
use crate::sense::{failure_answer, mpath_pr, mpath_wants_tur, Answer, Failure, SenseCode, Status};
use crate::wire::OP_CLEANUP;

/// Tells whether an fd is a multipath map.
pub trait MapProbe: Send + Sync {
    fn probe(&self, fd: BorrowedFd<'_>) -> MapKind;
}

impl MapProbe for DmControl {
    fn probe(&self, fd: BorrowedFd<'_>) -> MapKind {
        DmControl::probe(self, fd)
    }
}

/// Configuration warnings, repeated when a command fails for their reason.
#[derive(Clone, Debug, Default)]
pub struct Diagnostics {
    /// What is wrong with `reservation_key` for this multipath-tools.
    pub key_config: Vec<String>,
    /// reservd runs as a non-root user.
    pub non_root: bool,
}

/// The multipath side of the router.
pub struct Multipath {
    pub lib: Arc<dyn PersistLib>,
    pub multipathd: Multipathd,
    pub diagnostics: Diagnostics,
    /// Timeout of the TEST UNIT READY that recovers lost sense.
    pub tur_timeout_ms: u32,
}

const TEST_UNIT_READY: [u8; 6] = [0; 6];

impl Multipath {
    /// Run `cmd` on the multipath map `dm-<minor>`.
    fn execute(&self, cmd: &Command<'_>, minor: u32) -> Result<Answer, BackendError> {
        match cmd.cdb[0] {
            PERSISTENT_RESERVE_IN => Ok(self.prin(cmd, minor)),
            PERSISTENT_RESERVE_OUT => Ok(match prout_request(cmd.cdb, cmd.params) {
                Ok(req) => self.prout(cmd.fd, &req, minor),
                Err(sense) => Answer::check(sense),
            }),
            OP_CLEANUP => self.cleanup(cmd.fd, minor),
            _ => Ok(Answer::check(SenseCode::INVALID_OPCODE)),
        }
    }

    fn prin(&self, cmd: &Command<'_>, minor: u32) -> Answer {
        let sa = match prin_service_action(cmd.cdb) {
            Ok(sa) => sa,
            Err(sense) => return Answer::check(sense),
        };
        let (code, resp) = self.lib.reserve_in(cmd.fd, sa);
        log::debug!("dm-{minor}: PR IN service action {sa}: libmpathpersist returned {code}");
        if code != mpath_pr::SUCCESS {
            return self.failure(cmd.fd, code, minor);
        }
        match prin_data(sa, &resp) {
            Ok(data) => Answer::good(data),
            Err(FullStatusError::TooManyDescriptors(n)) => {
                log::warn!(
                    "dm-{minor}: READ FULL STATUS returned {n} registrations; libmpathpersist \
                     cannot decode more than 31 of them intact, answering INVALID FIELD IN CDB \
                     (use READ KEYS)"
                );
                Answer::check(SenseCode::INVALID_FIELD)
            }
        }
    }

    fn prout(&self, fd: BorrowedFd<'_>, req: &ProutRequest, minor: u32) -> Answer {
        let code = self.lib.reserve_out(fd, req);
        log::debug!(
            "dm-{minor}: PR OUT service action {} type {}: libmpathpersist returned {code}",
            req.service_action,
            req.pr_type
        );
        if code == mpath_pr::SUCCESS {
            Answer::status(Status::GOOD)
        } else {
            self.failure(fd, code, minor)
        }
    }

    fn cleanup(&self, fd: BorrowedFd<'_>, minor: u32) -> Result<Answer, BackendError> {
        let service = |e: std::io::Error| {
            BackendError::Service(format!(
                "CLEANUP on dm-{minor}: multipathd at {}: {e}",
                self.multipathd.describe()
            ))
        };
        let mut conn = self.multipathd.connect().map_err(service)?;
        clear_map_keys(&mut conn, minor).map_err(service)?;
        drop(conn);
        Ok(self.prout(fd, &ProutRequest::unregister(), minor))
    }

    /// The answer for a failed library call, with the warning that explains
    /// the likely cause.
    fn failure(&self, fd: BorrowedFd<'_>, code: i32, minor: u32) -> Answer {
        match code {
            mpath_pr::SYNTAX_ERROR => {
                let why = if self.diagnostics.key_config.is_empty() {
                    "the command's keys differ from the reservation_key multipath-tools has for \
                     this map (multipath.conf, or /etc/multipath/prkeys with 'reservation_key file')"
                        .to_string()
                } else {
                    self.diagnostics.key_config.join("; ")
                };
                log::warn!("dm-{minor}: libmpathpersist refused the command: {why}");
            }
            mpath_pr::DMMP_ERROR => {
                let quick = self.multipathd.clone().with_timeout(Duration::from_secs(2));
                match quick.connect() {
                    Err(e) => log::warn!(
                        "dm-{minor}: libmpathpersist failed and multipathd is unreachable ({e}): \
                         with 'reservation_key file' every registration needs multipathd"
                    ),
                    Ok(_) => log::warn!(
                        "dm-{minor}: libmpathpersist failed (no usable path, or multipathd refused \
                         the key)"
                    ),
                }
            }
            mpath_pr::FILE_ERROR if self.diagnostics.non_root => log::warn!(
                "dm-{minor}: libmpathpersist could not open a path device: reservd runs as a \
                 non-root user (-u)"
            ),
            _ => {}
        }
        if mpath_wants_tur(code) {
            let tur = sg_io(fd, &TEST_UNIT_READY, Transfer::None, self.tur_timeout_ms);
            if tur.answer.status != Status::GOOD {
                return tur.answer;
            }
        }
        failure_answer(Failure::Mpath(code))
    }
}

/// Loads the multipath side: libmpathpersist and its diagnostics.
pub type Loader = Box<dyn FnOnce() -> Option<Multipath> + Send>;

/// The backend reservd serves with: multipath maps to libmpathpersist
/// (when available), everything else to SG_IO.
pub struct Router {
    pub sgio: SgIo,
    /// Tells maps from other devices; `None` without device-mapper.
    probe: Option<Box<dyn MapProbe>>,
    /// The multipath side, once loaded (`None` inside: unavailable).
    mpath: OnceLock<Option<Multipath>>,
    /// What loads it, until it has run.
    loader: Mutex<Option<Loader>>,
}

impl Router {
    /// A router whose multipath side is known now.
    pub fn ready(sgio: SgIo, probe: Option<Box<dyn MapProbe>>, mpath: Option<Multipath>) -> Router {
        Router {
            sgio,
            probe,
            mpath: OnceLock::from(mpath),
            loader: Mutex::new(None),
        }
    }

    /// A router whose multipath side `loader` loads, on the first command
    /// for a map or on [`Router::load_multipath`], whichever comes first.
    pub fn deferred(sgio: SgIo, probe: Box<dyn MapProbe>, loader: Loader) -> Router {
        Router {
            sgio,
            probe: Some(probe),
            mpath: OnceLock::new(),
            loader: Mutex::new(Some(loader)),
        }
    }

    /// The multipath side, loading it first if it is not yet; while another
    /// thread loads it, waits for it.
    pub fn load_multipath(&self) -> Option<&Multipath> {
        self.mpath
            .get_or_init(|| {
                let loader = self.loader.lock().unwrap_or_else(|e| e.into_inner()).take();
                loader.and_then(|load| load())
            })
            .as_ref()
    }

    /// Whether the multipath side is still to be loaded.
    pub fn loading_pending(&self) -> bool {
        self.mpath.get().is_none()
    }

    /// Whether maps go to libmpathpersist now (false while it loads).
    pub fn multipath_active(&self) -> bool {
        matches!(self.mpath.get(), Some(Some(_)))
    }
}

impl PrBackend for Router {
    fn execute(&self, cmd: &Command<'_>) -> Result<Answer, BackendError> {
        if let Some(probe) = &self.probe {
            if let MapKind::Multipath { minor } = probe.probe(cmd.fd) {
                if let Some(m) = self.load_multipath() {
                    return m.execute(cmd, minor);
                }
            }
        }
        self.sgio.execute(cmd)
    }
}

/// The outcome of loading libmpathpersist.
pub struct Loaded {
    pub multipath: Option<Multipath>,
    /// For the log: "active (multipath-tools 0.9.4, /lib/...)" or
    /// "inactive, ...".
    pub summary: String,
    /// Warnings to log once.
    pub warnings: Vec<String>,
}

/// Why multipath support is off when device-mapper is missing.
pub fn no_device_mapper(e: &super::dm::DmUnavailable) -> String {
    format!("inactive, no device-mapper ({e}); every device uses SG_IO")
}

/// Why multipath support is off when libmpathpersist is missing.
pub fn no_library(e: &dyn std::fmt::Display) -> String {
    format!(
        "inactive, libmpathpersist unavailable ({e}); install multipath-tools (Debian/Ubuntu) or \
         device-mapper-multipath (Fedora/RHEL); multipath maps use SG_IO on one path"
    )
}

impl Loaded {
    /// Load and initialise libmpathpersist, and check multipath-tools'
    /// setup. Only with device-mapper present (a [`DmControl`] opened):
    /// libmultipath exits the process when it cannot reach it.
    /// `runs_as_root`: whether reservd keeps uid 0.
    pub fn load(runs_as_root: bool, sgio_timeout_ms: u32) -> Loaded {
        let verbose = match log::max_level() {
            log::LevelFilter::Trace => 4,
            log::LevelFilter::Debug => 3,
            log::LevelFilter::Info | log::LevelFilter::Warn => 1,
            _ => 0,
        };
        let lib = match Libmpathpersist::load(mpath_sys::DEFAULT_LIBRARY, verbose) {
            Ok(lib) => lib,
            Err(e) => {
                return Loaded {
                    multipath: None,
                    summary: no_library(&e),
                    warnings: Vec::new(),
                }
            }
        };
        let summary = format!(
            "active (multipath-tools {}, {})",
            lib.version_string(),
            lib.path().unwrap_or(mpath_sys::DEFAULT_LIBRARY)
        );
        let mut warnings = Vec::new();
        let key_config = crate::mpconf::diagnose(&read_key_config(), lib.version());
        warnings.extend(key_config.iter().cloned());
        let multipathd = Multipathd::from_env();
        let quick = multipathd.clone().with_timeout(Duration::from_secs(2));
        if let Err(e) = quick.connect().and_then(|mut c| c.command("show daemon")) {
            warnings.push(format!(
                "multipathd is not reachable ({e}): keys will not be registered on new or \
                 reinstated paths, and with 'reservation_key file' every registration fails"
            ));
        }
        if !runs_as_root {
            warnings.push(
                "with -u, multipath PR commands need the user to open the /dev/sdX path devices \
                 (libmpathpersist does), and multipathd refuses key updates from users other \
                 than root: keep reservd as root for multipath"
                    .to_string(),
            );
        }
        Loaded {
            multipath: Some(Multipath {
                lib: Arc::new(lib),
                multipathd,
                diagnostics: Diagnostics {
                    key_config,
                    non_root: !runs_as_root,
                },
                tur_timeout_ms: sgio_timeout_ms,
            }),
            summary,
            warnings,
        }
    }
}

impl Loaded {
    /// Log the outcome: the summary, then the warnings.
    pub fn log(&self) {
        log::info!("multipath support: {}", self.summary);
        for w in &self.warnings {
            log::warn!("{w}");
        }
    }
}

/// `reservation_key` settings from /etc/multipath.conf and
/// /etc/multipath/conf.d/*.conf.
pub fn read_key_config() -> crate::mpconf::KeyConfig {
    let mut cfg = crate::mpconf::KeyConfig::default();
    if let Ok(t) = std::fs::read_to_string("/etc/multipath.conf") {
        cfg = crate::mpconf::parse(&t);
    }
    if let Ok(dir) = std::fs::read_dir("/etc/multipath/conf.d") {
        let mut files: Vec<_> = dir
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "conf"))
            .collect();
        files.sort();
        for f in files {
            if let Ok(t) = std::fs::read_to_string(&f) {
                cfg.merge(crate::mpconf::parse(&t));
            }
        }
    }
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdb::{pad16, PrInCdb, PrOutCdb};
    use crate::multipathd::fake::Fake;
    use std::os::fd::AsFd;
    use std::sync::Mutex;

    /// Calls seen by the fake library.
    #[derive(Debug, PartialEq, Eq)]
    enum Call {
        In(u8),
        Out(ProutRequest),
    }

    struct FakeLib {
        code: i32,
        resp: Vec<u8>,
        calls: Mutex<Vec<Call>>,
    }

    impl FakeLib {
        fn new(code: i32, resp: Vec<u8>) -> Arc<FakeLib> {
            Arc::new(FakeLib {
                code,
                resp,
                calls: Mutex::new(Vec::new()),
            })
        }
    }

    impl PersistLib for FakeLib {
        fn reserve_in(&self, _fd: BorrowedFd<'_>, sa: u8) -> (i32, Vec<u8>) {
            self.calls.lock().unwrap().push(Call::In(sa));
            let mut r = vec![0u8; crate::mpath_xlate::prin_buffer_size(sa)];
            r[..self.resp.len()].copy_from_slice(&self.resp);
            (self.code, r)
        }
        fn reserve_out(&self, _fd: BorrowedFd<'_>, req: &ProutRequest) -> i32 {
            self.calls.lock().unwrap().push(Call::Out(req.clone()));
            self.code
        }
    }

    struct FixedProbe(MapKind);
    impl MapProbe for FixedProbe {
        fn probe(&self, _fd: BorrowedFd<'_>) -> MapKind {
            self.0
        }
    }

    fn router(kind: MapKind, lib: Arc<FakeLib>, multipathd: Multipathd) -> Router {
        Router::ready(
            SgIo::default(),
            Some(Box::new(FixedProbe(kind))),
            Some(Multipath {
                lib,
                multipathd,
                diagnostics: Diagnostics::default(),
                tur_timeout_ms: 1000,
            }),
        )
    }

    fn nowhere() -> Multipathd {
        Multipathd::from_env_value(Some("/nonexistent/reservd-test/multipathd.socket"))
    }

    fn run(r: &Router, cdb: &[u8], params: &[u8]) -> Result<Answer, BackendError> {
        // A regular file opened read-write stands for the device: SG_IO on
        // it fails (ENOTTY).
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "reservd-router-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        let cdb = pad16(cdb);
        super::super::execute(
            r,
            &Command {
                nexus: 1,
                peer: None,
                fd: f.as_fd(),
                cdb: &cdb,
                params,
            },
        )
    }

    fn prout_cdb(sa: u8, pr_type: u8, len: u32) -> [u8; 10] {
        PrOutCdb {
            service_action: sa,
            scope: 0,
            pr_type,
            parameter_list_length: len,
        }
        .encode()
    }

    /// READ KEYS with the largest allocation length.
    fn read_keys_cdb() -> [u8; 10] {
        PrInCdb {
            service_action: 0,
            allocation_length: 8192,
        }
        .encode()
    }

    fn basic(key: u64, sa_key: u64) -> Vec<u8> {
        let mut p = vec![0u8; 24];
        p[..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa_key.to_be_bytes());
        p
    }

    #[test]
    fn non_multipath_fds_go_to_sg_io() {
        let lib = FakeLib::new(0, vec![]);
        let r = router(MapKind::Other, lib.clone(), nowhere());
        let a = run(&r, &read_keys_cdb(), &[]).unwrap();
        // SG_IO on a regular file: ENOTTY → ABORTED COMMAND / I/O ERROR.
        assert_eq!(a, Answer::check(SenseCode::IO_ERROR));
        assert!(lib.calls.lock().unwrap().is_empty());
        // Without multipath support at all, the same.
        let plain = Router::ready(SgIo::default(), None, None);
        let a = run(&plain, &read_keys_cdb(), &[]).unwrap();
        assert_eq!(a, Answer::check(SenseCode::IO_ERROR));
    }

    #[test]
    fn a_deferred_library_loads_once_on_the_first_map_command() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let loads = Arc::new(AtomicUsize::new(0));
        let lib = FakeLib::new(0, vec![0u8; 8]);
        let deferred = |kind, loads: &Arc<AtomicUsize>, lib: Option<Arc<FakeLib>>| {
            let n = Arc::clone(loads);
            Router::deferred(
                SgIo::default(),
                Box::new(FixedProbe(kind)),
                Box::new(move || {
                    n.fetch_add(1, Ordering::SeqCst);
                    lib.map(|lib| Multipath {
                        lib,
                        multipathd: nowhere(),
                        diagnostics: Diagnostics::default(),
                        tur_timeout_ms: 1000,
                    })
                }),
            )
        };
        // A SCSI disk's command does not load it.
        let r = deferred(MapKind::Other, &loads, Some(lib.clone()));
        run(&r, &read_keys_cdb(), &[]).unwrap();
        assert_eq!(loads.load(Ordering::SeqCst), 0);
        assert!(r.loading_pending() && !r.multipath_active());
        // A map's commands, from several threads: one load, every command
        // through the library.
        let r = deferred(MapKind::Multipath { minor: 3 }, &loads, Some(lib.clone()));
        std::thread::scope(|sc| {
            for _ in 0..4 {
                sc.spawn(|| {
                    let a = run(&r, &read_keys_cdb(), &[]).unwrap();
                    assert_eq!(a.status, Status::GOOD);
                });
            }
        });
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert_eq!(lib.calls.lock().unwrap().len(), 4);
        assert!(r.multipath_active() && !r.loading_pending());
        // A library that does not load: maps go to SG_IO, and it is not
        // tried again.
        let loads = Arc::new(AtomicUsize::new(0));
        let r = deferred(MapKind::Multipath { minor: 3 }, &loads, None);
        for _ in 0..2 {
            let a = run(&r, &read_keys_cdb(), &[]).unwrap();
            assert_eq!(a, Answer::check(SenseCode::IO_ERROR));
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert!(!r.multipath_active());
    }

    #[test]
    fn multipath_read_keys_goes_through_the_library() {
        let mut resp = vec![0u8; 16];
        resp[0..4].copy_from_slice(&5u32.to_ne_bytes());
        resp[4..8].copy_from_slice(&8u32.to_ne_bytes());
        resp[8..16].copy_from_slice(&0x1234u64.to_be_bytes());
        let lib = FakeLib::new(0, resp);
        let r = router(MapKind::Multipath { minor: 3 }, lib.clone(), nowhere());
        let a = run(&r, &read_keys_cdb(), &[]).unwrap();
        assert_eq!(a.status, Status::GOOD);
        assert_eq!(
            a.data,
            [0, 0, 0, 5, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0x12, 0x34]
        );
        assert_eq!(*lib.calls.lock().unwrap(), vec![Call::In(0)]);
    }

    #[test]
    fn multipath_prout_translates_and_maps_codes() {
        let lib = FakeLib::new(mpath_pr::RESERV_CONFLICT, vec![]);
        let r = router(MapKind::Multipath { minor: 3 }, lib.clone(), nowhere());
        let a = run(&r, &prout_cdb(1, 5, 24), &basic(0xab, 0)).unwrap();
        assert_eq!(a, Answer::status(Status::RESERVATION_CONFLICT));
        let calls = lib.calls.lock().unwrap();
        let Call::Out(req) = &calls[0] else { panic!() };
        assert_eq!((req.service_action, req.pr_type), (1, 5));
        assert_eq!(&req.header[..8], &0xabu64.to_be_bytes());
    }

    #[test]
    fn invalid_commands_never_reach_the_library() {
        let lib = FakeLib::new(0, vec![]);
        let r = router(MapKind::Multipath { minor: 3 }, lib.clone(), nowhere());
        // REGISTER AND MOVE.
        let a = run(&r, &prout_cdb(7, 0, 24), &basic(1, 2)).unwrap();
        assert_eq!(a, Answer::check(SenseCode::INVALID_FIELD));
        // PR IN service action 4.
        let a = run(
            &r,
            &PrInCdb {
                service_action: 4,
                allocation_length: 8,
            }
            .encode(),
            &[],
        )
        .unwrap();
        assert_eq!(a, Answer::check(SenseCode::INVALID_FIELD));
        // Short parameter list.
        let a = run(&r, &prout_cdb(0, 0, 8), &[0; 8]).unwrap();
        assert_eq!(a, Answer::check(SenseCode::INVALID_PARAM_LEN));
        assert!(lib.calls.lock().unwrap().is_empty());
    }

    #[test]
    fn lost_sense_is_recovered_with_test_unit_ready() {
        // NOT READY from the library; the TUR on the fd (a regular file,
        // ENOTTY) fails, and its answer is what the guest gets.
        let lib = FakeLib::new(mpath_pr::SENSE_NOT_READY, vec![]);
        let r = router(MapKind::Multipath { minor: 3 }, lib, nowhere());
        let a = run(&r, &prout_cdb(0, 0, 24), &basic(0, 1)).unwrap();
        assert_eq!(a, Answer::check(SenseCode::IO_ERROR));
        // Codes without a TUR are mapped directly.
        let lib = FakeLib::new(mpath_pr::SENSE_UNIT_ATTENTION, vec![]);
        let r = router(MapKind::Multipath { minor: 3 }, lib, nowhere());
        let a = run(&r, &prout_cdb(0, 0, 24), &basic(0, 1)).unwrap();
        assert_eq!(a, Answer::check(SenseCode::SCSI_BUS_RESET));
        let lib = FakeLib::new(mpath_pr::DMMP_ERROR, vec![]);
        let r = router(MapKind::Multipath { minor: 3 }, lib, nowhere());
        let a = run(&r, &prout_cdb(0, 0, 24), &basic(0, 1)).unwrap();
        assert_eq!(a, Answer::check(SenseCode::LUN_COMM_FAILURE));
    }

    #[test]
    fn too_many_full_status_records_are_refused() {
        let mut resp = vec![0u8; 8];
        resp[4..8].copy_from_slice(&40u32.to_ne_bytes());
        let lib = FakeLib::new(0, resp);
        let r = router(MapKind::Multipath { minor: 3 }, lib, nowhere());
        let a = run(
            &r,
            &PrInCdb {
                service_action: 3,
                allocation_length: 8192,
            }
            .encode(),
            &[],
        )
        .unwrap();
        assert_eq!(a, Answer::check(SenseCode::INVALID_FIELD));
    }

    #[test]
    fn cleanup_talks_to_multipathd_then_unregisters() {
        let fake = Fake::start(1, |_| Some("ok\n".into()));
        let lib = FakeLib::new(0, vec![]);
        let r = router(MapKind::Multipath { minor: 9 }, lib.clone(), fake.client());
        let a = run(&r, &[OP_CLEANUP], &[]).unwrap();
        assert_eq!(a, Answer::status(Status::GOOD));
        assert_eq!(
            fake.finish(),
            vec!["unsetprkey map dm-9", "unsetprstatus map dm-9"]
        );
        assert_eq!(
            *lib.calls.lock().unwrap(),
            vec![Call::Out(ProutRequest::unregister())]
        );
    }

    #[test]
    fn cleanup_without_multipathd_closes_the_connection() {
        let lib = FakeLib::new(0, vec![]);
        let r = router(MapKind::Multipath { minor: 9 }, lib.clone(), nowhere());
        assert!(matches!(
            run(&r, &[OP_CLEANUP], &[]),
            Err(BackendError::Service(_))
        ));
        // multipathd refusing is the same.
        let fake = Fake::start(1, |_| Some("fail\n".into()));
        let r = router(MapKind::Multipath { minor: 9 }, lib.clone(), fake.client());
        assert!(matches!(
            run(&r, &[OP_CLEANUP], &[]),
            Err(BackendError::Service(_))
        ));
        fake.finish();
        assert!(lib.calls.lock().unwrap().is_empty());
    }

    #[test]
    fn cleanup_on_a_plain_device_is_good() {
        let lib = FakeLib::new(0, vec![]);
        let r = router(MapKind::Other, lib.clone(), nowhere());
        assert_eq!(
            run(&r, &[OP_CLEANUP], &[]).unwrap(),
            Answer::status(Status::GOOD)
        );
        assert!(lib.calls.lock().unwrap().is_empty());
    }
}
