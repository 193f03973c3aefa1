//! A simulated multipath stack: one LU (the in-memory SPC-4 target) reached
//! through several paths (nexuses), multipathd's key, and a libmpathpersist
//! that behaves as multipath-tools 0.9.4 does. The multipath backend's
//! tests run it through [`SimMap`].

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use reservd_daemon::backend::multipath::library::PersistLib;
use reservd_daemon::backend::multipath::{basic_params, prin_cdb, prout_cdb, MapDevices, Via};
use reservd_daemon::backend::{Command, Nexus, PrBackend};
use reservd_proto::cdb::{pad16, prin_sa, prout_sa, PERSISTENT_RESERVE_OUT};
use reservd_proto::mpath;
use reservd_proto::mpath_xlate::{prin_buffer_size, ProutRequest};
use reservd_proto::onenexus::Prout;
use reservd_proto::prin;
use reservd_proto::sense::{failure_answer, Answer, Failure, Status};

use crate::disks::unlinked_file;
use crate::emulated::Emulated;

fn is_unit_attention(a: &Answer) -> bool {
    a.status == Status::CHECK_CONDITION && a.sense_code().is_some_and(|c| c.key == 0x06)
}

fn good(a: &Answer) -> bool {
    a.status == Status::GOOD
}

/// A path of the simulated map.
pub struct SimPath {
    pub node: PathBuf,
    pub nexus: Nexus,
    pub active: bool,
    /// Set running again, not reinstated yet: libmpathpersist's own
    /// check finds it up, device-mapper does not use it.
    pub returning: bool,
}

pub struct SimMap {
    pub target: Emulated,
    /// The LU: a temporary file, the target tells LUs apart by inode.
    pub lu: File,
    pub paths: Mutex<Vec<SimPath>>,
    /// multipathd's key for the map.
    pub prkey: Mutex<Option<u64>>,
    /// multipathd is reachable.
    pub multipathd_up: bool,
    /// What happened, in order: commands per path, suspend, resume,
    /// library calls.
    pub events: Mutex<Vec<String>>,
    pub suspended: Mutex<bool>,
    /// The path (index) that fails under the library's next command to
    /// it: set offline before the command, which fails (FILE_ERROR).
    pub fails_under_library: Mutex<Option<usize>>,
}

/// The other node's nexus.
pub const NODE2: Nexus = 100;

impl SimMap {
    /// A map with `n` paths, nexuses 1..=n, all active.
    pub fn new(n: usize) -> Arc<SimMap> {
        let lu = unlinked_file("simlu");
        Arc::new(SimMap {
            target: Emulated::new(),
            lu,
            paths: Mutex::new(
                (1..=n)
                    .map(|i| SimPath {
                        node: PathBuf::from(format!("/dev/sim{i}")),
                        nexus: i as Nexus,
                        active: true,
                        returning: false,
                    })
                    .collect(),
            ),
            prkey: Mutex::new(None),
            multipathd_up: true,
            events: Mutex::new(Vec::new()),
            suspended: Mutex::new(false),
            fails_under_library: Mutex::new(None),
        })
    }

    pub fn set_active(&self, i: usize, active: bool) {
        self.paths.lock().unwrap()[i].active = active;
    }

    pub fn set_returning(&self, i: usize, returning: bool) {
        self.paths.lock().unwrap()[i].returning = returning;
    }

    /// The paths the library finds up: device-mapper's active ones and
    /// those coming back.
    fn library_paths(&self) -> Vec<(PathBuf, Nexus)> {
        self.paths
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.active || p.returning)
            .map(|p| (p.node.clone(), p.nexus))
            .collect()
    }

    fn note(&self, e: String) {
        self.events.lock().unwrap().push(e);
    }

    pub fn take_events(&self) -> Vec<String> {
        std::mem::take(&mut self.events.lock().unwrap())
    }

    /// A PR command from `nexus` straight to the LU.
    pub fn send(&self, nexus: Nexus, cdb: &[u8; 10], params: &[u8]) -> Answer {
        let cdb = pad16(cdb);
        self.target
            .execute(&Command {
                nexus,
                peer: None,
                fd: self.lu.as_fd(),
                cdb: &cdb,
                params,
            })
            .expect("the emulated target answers")
    }

    pub fn out(&self, nexus: Nexus, sa: u8, t: u8, key: u64, sa_key: u64) -> Answer {
        self.send(nexus, &prout_cdb(sa, 0, t), &basic_params(key, sa_key))
    }

    /// READ KEYS from `nexus`, past unit attentions.
    pub fn keys(&self, nexus: Nexus) -> Vec<u64> {
        let a = self.prin_past_ua(nexus, prin_sa::READ_KEYS);
        prin::parse_read_keys(&a.data).unwrap().1
    }

    pub fn reservation(&self, nexus: Nexus) -> Option<prin::Reservation> {
        let a = self.prin_past_ua(nexus, prin_sa::READ_RESERVATION);
        prin::parse_read_reservation(&a.data).unwrap().1
    }

    fn prin_past_ua(&self, nexus: Nexus, sa: u8) -> Answer {
        for _ in 0..4 {
            let a = self.send(nexus, &prin_cdb(sa), &[]);
            if !is_unit_attention(&a) {
                assert!(good(&a), "PR IN {sa}: {a:?}");
                return a;
            }
        }
        panic!("unit attentions without end");
    }

    /// Whether a path's nexus is registered (with any key).
    pub fn registered(&self, nexus: Nexus) -> bool {
        // REGISTER with the nexus' own key is refused only when it is
        // not registered: use READ FULL STATUS instead, by initiator.
        let a = self.prin_past_ua(nexus, prin_sa::READ_FULL_STATUS);
        let tid = Emulated::initiator_transport_id(nexus).encode();
        prin::parse_read_full_status(&a.data)
            .unwrap()
            .1
            .iter()
            .any(|d| d.transport_id == tid)
    }

    fn active(&self) -> Vec<(PathBuf, Nexus)> {
        self.paths
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.active)
            .map(|p| (p.node.clone(), p.nexus))
            .collect()
    }

    fn first_active(&self) -> Option<Nexus> {
        self.active().first().map(|p| p.1)
    }

    /// The library's PR OUT on one path, as 0.9.4's
    /// prout_do_scsi_ioctl: unit attentions retried.
    fn lib_out(&self, nexus: Nexus, sa: u8, scope: u8, t: u8, params: &[u8]) -> i32 {
        self.note(format!("lib {sa} on {nexus}"));
        let mut fails = self.fails_under_library.lock().unwrap();
        if let Some(i) = *fails {
            let mut paths = self.paths.lock().unwrap();
            if paths[i].nexus == nexus {
                paths[i].active = false;
                *fails = None;
                return mpath::FILE_ERROR;
            }
        }
        drop(fails);
        let mut a = self.send(nexus, &prout_cdb(sa, scope, t), params);
        for _ in 0..3 {
            if !is_unit_attention(&a) {
                break;
            }
            a = self.send(nexus, &prout_cdb(sa, scope, t), params);
        }
        to_code(&a)
    }
}

fn to_code(a: &Answer) -> i32 {
    match a.status {
        Status::GOOD => mpath::SUCCESS,
        Status::RESERVATION_CONFLICT => mpath::RESERV_CONFLICT,
        _ => match a.sense_code().map(|s| s.key) {
            Some(0x05) => mpath::ILLEGAL_REQ,
            Some(0x06) => mpath::SENSE_UNIT_ATTENTION,
            Some(0x02) => mpath::SENSE_NOT_READY,
            _ => mpath::OTHER,
        },
    }
}

impl MapDevices for SimMap {
    fn map_key(&self, _minor: u32) -> Result<Option<u64>, String> {
        if self.multipathd_up {
            Ok(*self.prkey.lock().unwrap())
        } else {
            Err("multipathd: connection refused".into())
        }
    }

    fn active_paths(&self, _map: BorrowedFd<'_>) -> io::Result<Vec<PathBuf>> {
        Ok(self.active().into_iter().map(|p| p.0).collect())
    }

    fn run(&self, via: Via<'_>, cdb: &[u8; 10], params: &[u8]) -> Answer {
        let nexus = match via {
            Via::Map(_) => {
                assert!(
                    !*self.suspended.lock().unwrap(),
                    "a command on the suspended map would wait for the resume"
                );
                self.first_active()
            }
            Via::Path(node) => self
                .paths
                .lock()
                .unwrap()
                .iter()
                .find(|p| p.node == node && p.active)
                .map(|p| p.nexus),
        };
        let Some(nexus) = nexus else {
            return failure_answer(Failure::HostStatus(0x01));
        };
        if cdb[0] == PERSISTENT_RESERVE_OUT {
            self.note(format!("sg {} on {nexus}", cdb[1] & 0x1f));
        }
        self.send(nexus, cdb, params)
    }

    fn suspend(&self, _map: BorrowedFd<'_>) -> io::Result<()> {
        self.note("suspend".into());
        *self.suspended.lock().unwrap() = true;
        Ok(())
    }

    fn resume(&self, _map: BorrowedFd<'_>) -> io::Result<()> {
        self.note("resume".into());
        *self.suspended.lock().unwrap() = false;
        Ok(())
    }
}

impl PersistLib for SimMap {
    fn reserve_in(&self, _fd: BorrowedFd<'_>, sa: u8) -> (i32, Vec<u8>) {
        let mut resp = vec![0u8; prin_buffer_size(sa)];
        let Some(nexus) = self.first_active() else {
            return (mpath::DMMP_ERROR, resp);
        };
        if sa != prin_sa::READ_KEYS && sa != prin_sa::READ_RESERVATION {
            return (mpath::OTHER, resp);
        }
        let a = self.send(nexus, &prin_cdb(sa), &[]);
        if !good(&a) {
            return (to_code(&a), resp);
        }
        // The library's prin_resp: the two leading words in host order.
        let gen = u32::from_be_bytes(a.data[0..4].try_into().unwrap());
        let len = u32::from_be_bytes(a.data[4..8].try_into().unwrap());
        resp[0..4].copy_from_slice(&gen.to_ne_bytes());
        resp[4..8].copy_from_slice(&len.to_ne_bytes());
        resp[8..a.data.len()].copy_from_slice(&a.data[8..]);
        (mpath::SUCCESS, resp)
    }

    /// multipath-tools 0.9.4's `do_mpath_persistent_reserve_out`, with
    /// `reservation_key file`.
    fn reserve_out(&self, _fd: BorrowedFd<'_>, req: &ProutRequest) -> i32 {
        let c = Prout::of(req);
        let params = req.header.to_vec();
        let mut prkey = self.prkey.lock().unwrap();
        let mut rk = prkey.unwrap_or(0);
        if c.sa_key != 0
            && (c.service_action == prout_sa::REGISTER_AND_IGNORE
                || (c.service_action == prout_sa::REGISTER && (rk == 0 || c.key == rk)))
        {
            rk = c.sa_key;
            *prkey = Some(rk);
        }
        if c.key != rk
            && c.sa_key != rk
            && (c.sa_key != 0 || c.service_action != prout_sa::REGISTER_AND_IGNORE)
        {
            self.note("lib: configured reservation key doesn't match".into());
            return mpath::SYNTAX_ERROR;
        }
        drop(prkey);
        let active = self.library_paths();
        if active.is_empty() {
            return mpath::DMMP_ERROR;
        }
        let code = match c.service_action {
            prout_sa::REGISTER | prout_sa::REGISTER_AND_IGNORE => {
                let mut status = mpath::SUCCESS;
                for (_, n) in &active {
                    let r = self.lib_out(*n, c.service_action, c.scope, c.pr_type, &params);
                    if status == mpath::SUCCESS {
                        status = r;
                    }
                }
                status
            }
            prout_sa::RELEASE => {
                for (_, n) in &active {
                    self.lib_out(*n, c.service_action, c.scope, c.pr_type, &params);
                }
                // The fallback: any reservation left is "held by a
                // path not available": CLEAR, then register the
                // other keys again (SPEC_I_PT, which the emulated
                // target refuses for known initiators' nexuses).
                let first = active[0].1;
                if self.reservation(first).is_some() {
                    self.note("lib: release fallback clears the LU".into());
                    self.lib_out(first, prout_sa::CLEAR, 0, 0, &basic_params(rk, 0));
                    for (_, n) in &active {
                        self.lib_out(*n, prout_sa::REGISTER, 0, 0, &basic_params(0, rk));
                    }
                }
                mpath::SUCCESS
            }
            _ => self.lib_out(active[0].1, c.service_action, c.scope, c.pr_type, &params),
        };
        if code == mpath::SUCCESS {
            let mut prkey = self.prkey.lock().unwrap();
            match c.service_action {
                prout_sa::REGISTER | prout_sa::REGISTER_AND_IGNORE if c.sa_key == 0 => {
                    *prkey = None
                }
                prout_sa::CLEAR => *prkey = None,
                _ => {}
            }
        }
        code
    }
}
