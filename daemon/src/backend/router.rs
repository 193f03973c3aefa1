//! Routing: each command goes to the multipath side when its fd is a
//! dm-multipath map, to SG_IO otherwise.
//!
//! Multipath support needs a usable `/dev/mapper/control` (a [`MapProbe`])
//! and libmpathpersist ([`Multipath`], see [`super::multipath`], loaded by
//! a [`Loader`] on the first map command or in the background at start-up).
//! Without either, reservd serves every device through SG_IO (multipath
//! maps included, on one path only) and says so in its start-up line.

use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex, OnceLock};

use super::dm::{DmControl, MapKind};
use super::multipath::{Loader, Multipath};
use super::sgio::SgIo;
use super::{BackendError, BackendKind, Command, PrBackend};
use reservd_proto::sense::Answer;

/// Tells whether an fd is a multipath map.
pub trait MapProbe: Send + Sync {
    fn probe(&self, fd: BorrowedFd<'_>) -> MapKind;
}

impl MapProbe for DmControl {
    fn probe(&self, fd: BorrowedFd<'_>) -> MapKind {
        DmControl::probe(self, fd)
    }
}

impl MapProbe for Arc<DmControl> {
    fn probe(&self, fd: BorrowedFd<'_>) -> MapKind {
        DmControl::probe(self, fd)
    }
}

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

    /// The multipath side, if it is loaded (without loading it).
    pub fn multipath(&self) -> Option<&Multipath> {
        self.mpath.get().and_then(Option::as_ref)
    }

    /// Run `cmd` on the backend its fd needs; also says which one ran it.
    pub fn execute_routed(&self, cmd: &Command<'_>) -> (Result<Answer, BackendError>, BackendKind) {
        if let Some(probe) = &self.probe {
            if let MapKind::Multipath { minor } = probe.probe(cmd.fd) {
                if let Some(m) = self.load_multipath() {
                    return (m.execute(cmd, minor), BackendKind::Multipath);
                }
            }
        }
        (self.sgio.execute(cmd), BackendKind::SgIo)
    }
}

impl PrBackend for Router {
    fn execute(&self, cmd: &Command<'_>) -> Result<Answer, BackendError> {
        self.execute_routed(cmd).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::multipath::library::PersistLib;
    use crate::backend::multipath::multipathd::fake::Fake;
    use crate::backend::multipath::multipathd::Multipathd;
    use crate::backend::multipath::{Diagnostics, MapDevices, Via};
    use reservd_proto::cdb::{pad16, PrInCdb, PrOutCdb};
    use reservd_proto::mpath;
    use reservd_proto::mpath_xlate::ProutRequest;
    use reservd_proto::onenexus::Fixes;
    use reservd_proto::sense::{SenseCode, Status};
    use reservd_proto::wire::OP_CLEANUP;
    use std::os::fd::AsFd;
    use std::path::PathBuf;
    use std::sync::Mutex;

    /// A host where multipathd cannot be asked for the map's key: PR OUT
    /// goes to the library as it is (RELEASE aside).
    struct NoDevices;

    impl MapDevices for NoDevices {
        fn map_key(&self, _minor: u32) -> Result<Option<u64>, String> {
            Err("multipathd: no such socket".into())
        }
        fn active_paths(&self, _map: BorrowedFd<'_>) -> std::io::Result<Vec<PathBuf>> {
            Ok(Vec::new())
        }
        fn run(&self, _via: Via<'_>, _cdb: &[u8; 10], _params: &[u8]) -> Answer {
            Answer::check(SenseCode::IO_ERROR)
        }
        fn suspend(&self, _map: BorrowedFd<'_>) -> std::io::Result<()> {
            Ok(())
        }
        fn resume(&self, _map: BorrowedFd<'_>) -> std::io::Result<()> {
            Ok(())
        }
    }

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
            let mut r = vec![0u8; reservd_proto::mpath_xlate::prin_buffer_size(sa)];
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
            Some(Multipath::new(
                lib,
                Arc::new(NoDevices),
                multipathd,
                Diagnostics::default(),
                Fixes::ALL,
                1000,
            )),
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
                    lib.map(|lib| {
                        Multipath::new(
                            lib,
                            Arc::new(NoDevices),
                            nowhere(),
                            Diagnostics::default(),
                            Fixes::ALL,
                            1000,
                        )
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
        let lib = FakeLib::new(mpath::RESERV_CONFLICT, vec![]);
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
        let lib = FakeLib::new(mpath::SENSE_NOT_READY, vec![]);
        let r = router(MapKind::Multipath { minor: 3 }, lib, nowhere());
        let a = run(&r, &prout_cdb(0, 0, 24), &basic(0, 1)).unwrap();
        assert_eq!(a, Answer::check(SenseCode::IO_ERROR));
        // Codes without a TUR are mapped directly.
        let lib = FakeLib::new(mpath::SENSE_UNIT_ATTENTION, vec![]);
        let r = router(MapKind::Multipath { minor: 3 }, lib, nowhere());
        let a = run(&r, &prout_cdb(0, 0, 24), &basic(0, 1)).unwrap();
        assert_eq!(a, Answer::check(SenseCode::SCSI_BUS_RESET));
        let lib = FakeLib::new(mpath::DMMP_ERROR, vec![]);
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
