//! The multipath side of the router: PR commands on dm-multipath maps,
//! through libmpathpersist, with the map answering as one I_T nexus.
//!
//! - PR IN (READ KEYS, READ RESERVATION, REPORT CAPABILITIES, READ FULL
//!   STATUS) describes the whole LU, so one path answers it, as in
//!   libmpathpersist, which sends it to the first usable path: reservd
//!   sends it down the map with SG_IO while the map has an active path,
//!   and through `mpath_persistent_reserve_in` (translated back to SPC-4
//!   data, see [`reservd_proto::mpath_xlate`]) when that fails below SCSI
//!   or no path is active. READ KEYS and READ FULL STATUS then list the
//!   map's own registration once ([`reservd_proto::onenexus`]).
//! - PR OUT: reservd first reads multipath-tools' key for the map
//!   (multipathd's `getprkey`), READ KEYS and READ RESERVATION (SG_IO on
//!   the map), and [`reservd_proto::onenexus::route`] decides how the command runs:
//!   answered at once, down one path, through
//!   `mpath_persistent_reserve_out`, or as a sequence of commands on the
//!   map's paths where the loaded library would get the map wrong. PR OUT
//!   commands on one map run one at a time; different maps' run side by
//!   side.
//! - The library's return codes are mapped by [`reservd_proto::mpath::answer`];
//!   for the four classes whose sense the library drops, a TEST UNIT READY
//!   on the map recovers it (see [`reservd_proto::mpath::wants_tur`]); an ILLEGAL
//!   REQUEST, which changed nothing, is sent again down one path for the
//!   device's own sense. A key the library refuses although it is the
//!   guest's own (a `reservation_key` fixed in multipath.conf) is ILLEGAL
//!   REQUEST, INVALID FIELD IN PARAMETER LIST, with an error in the log.
//! - CLEANUP (opcode 0xFF, only when enabled) clears the map's key and
//!   registered flag in multipathd over one connection, then unregisters
//!   the I_T nexuses with REGISTER AND IGNORE EXISTING KEY and a zero key.
//!   If multipathd cannot be reached or refuses, the client's connection is
//!   closed (no answer), as proposed upstream.
//!
//! Unit attentions that reservd's own commands meet on a path are consumed
//! (the command is repeated), as libmpathpersist does with its own.

pub mod library;
pub mod multipathd;
pub mod stats;
pub mod syslog;

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::dm::{block_node, DmControl};
use super::sgio::{sg_io, SgIo, Transfer};
use super::{BackendError, Command};

use library::{Libmpathpersist, PersistLib};
use multipathd::{clear_map_keys, Multipathd};
use reservd_proto::cdb::{
    pad16, prin_sa, prout_sa, PrInCdb, PrOutCdb, PERSISTENT_RESERVE_IN, PERSISTENT_RESERVE_OUT,
};
use reservd_proto::mpath;
use reservd_proto::mpath_xlate::{
    prin_data, prin_service_action, prout_request, FullStatusError, ProutRequest, PROUT_HEADER_SIZE,
};
use reservd_proto::onenexus::{self, Fixes, MapState, Prout, Route};
use reservd_proto::prin;
use reservd_proto::sense::{failure_answer, Answer, Failure, SenseCode, Status};
use reservd_proto::wire::OP_CLEANUP;

/// Where reservd sends a command of its own on a map.
#[derive(Clone, Copy, Debug)]
pub enum Via<'a> {
    /// The map itself: the kernel picks the path.
    Map(BorrowedFd<'a>),
    /// One path, by its device node.
    Path(&'a std::path::Path),
}

/// The devices of a map, for the commands reservd runs itself; the host's
/// are [`HostMaps`], tests use a simulated LU.
pub trait MapDevices: Send + Sync {
    /// The key multipath-tools keeps for map `dm-<minor>` (`None`: it has
    /// none); `Err` when it cannot be asked.
    fn map_key(&self, minor: u32) -> Result<Option<u64>, String>;
    /// The map's paths the kernel uses, in table order.
    fn active_paths(&self, map: BorrowedFd<'_>) -> io::Result<Vec<PathBuf>>;
    /// One PR command: a 10-byte CDB, PR OUT parameters, a PR IN
    /// allocation length. A PR IN answer carries its data.
    fn run(&self, via: Via<'_>, cdb: &[u8; 10], params: &[u8]) -> Answer;
    /// Suspend the map without flushing (I/O queues meanwhile).
    fn suspend(&self, map: BorrowedFd<'_>) -> io::Result<()>;
    fn resume(&self, map: BorrowedFd<'_>) -> io::Result<()>;
}

/// The host's maps: device-mapper for paths and suspension, SG_IO for
/// commands, multipathd for the key.
pub struct HostMaps {
    pub dm: Arc<DmControl>,
    pub multipathd: Multipathd,
    pub sgio: SgIo,
}

impl MapDevices for HostMaps {
    fn map_key(&self, minor: u32) -> Result<Option<u64>, String> {
        let mut conn = self
            .multipathd
            .connect()
            .map_err(|e| format!("multipathd: {e}"))?;
        multipathd::map_key(&mut conn, minor).map_err(|e| format!("multipathd: {e}"))
    }

    fn active_paths(&self, map: BorrowedFd<'_>) -> io::Result<Vec<PathBuf>> {
        self.dm
            .map_paths(map)?
            .into_iter()
            .filter(|p| p.active)
            .map(|p| block_node(p.dev))
            .collect()
    }

    fn run(&self, via: Via<'_>, cdb: &[u8; 10], params: &[u8]) -> Answer {
        let cdb = pad16(cdb);
        // The answer, and whether the command reached the device.
        let on = |fd: BorrowedFd<'_>| {
            self.sgio.pr_command(&Command {
                nexus: 0,
                peer: None,
                fd,
                cdb: &cdb,
                params,
            })
        };
        let on_path = |node: &std::path::Path| {
            use std::os::unix::fs::OpenOptionsExt;
            // CAP_SYS_RAWIO lets SG_IO send PR OUT on a read-only fd.
            match std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(node)
            {
                Ok(f) => on(f.as_fd()),
                Err(e) => {
                    log::warn!("cannot open map path {}: {e}", node.display());
                    let errno = e.raw_os_error().unwrap_or(libc::EIO);
                    (failure_answer(Failure::Errno(errno)), false)
                }
            }
        };
        match via {
            Via::Map(fd) => {
                let (a, reached) = on(fd);
                if reached {
                    return a;
                }
                // device-mapper passed the ioctl to the path it would use,
                // which failed under it (set offline, or gone) before
                // multipathd or device-mapper marked it failed; unlike I/O,
                // an ioctl is not retried on another path. The command
                // never reached the device: send it down the map's other
                // active paths.
                let paths = self.active_paths(fd).unwrap_or_default();
                for p in &paths {
                    let (b, reached) = on_path(p);
                    if reached {
                        log::info!(
                            "SG_IO on the map failed below SCSI; sent down path {} instead",
                            p.display()
                        );
                        return b;
                    }
                }
                a
            }
            Via::Path(node) => on_path(node).0,
        }
    }

    fn suspend(&self, map: BorrowedFd<'_>) -> io::Result<()> {
        self.dm.suspend(map)
    }

    fn resume(&self, map: BorrowedFd<'_>) -> io::Result<()> {
        self.dm.resume(map)
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
    pub devices: Arc<dyn MapDevices>,
    pub multipathd: Multipathd,
    pub diagnostics: Diagnostics,
    /// What reservd does itself for this library version.
    pub fixes: Fixes,
    /// Timeout of the TEST UNIT READY that recovers lost sense.
    pub tur_timeout_ms: u32,
    /// PR OUT commands on one map run one at a time (some are several
    /// commands on several paths, which must not interleave); commands on
    /// different maps run side by side. One lock per map minor.
    orders: Mutex<HashMap<u32, Arc<Mutex<()>>>>,
    /// multipath-tools' key per map minor, as multipathd last said it.
    keys: Mutex<HashMap<u32, (Option<u64>, Instant)>>,
    /// What the metrics count (see [`stats`]).
    pub stats: Arc<stats::MultipathStats>,
    /// After each PR OUT on a map, count the registrations of its key
    /// (READ KEYS on the map): reservd's metrics turn it on.
    pub registration_checks: bool,
}

/// How long multipathd's answer for a map's key is reused by PR IN. PR OUT
/// through reservd always asks again and forgets the cached key; only a key
/// changed outside reservd (mpathpersist, multipathd's configuration) is
/// seen up to this late in READ KEYS and READ FULL STATUS.
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(1);

const TEST_UNIT_READY: [u8; 6] = [0; 6];
/// How often a command of reservd's own is repeated past unit attentions.
const UNIT_ATTENTION_TRIES: usize = 4;

/// The CDB of a PR OUT reservd sends itself: a 24-byte parameter list.
pub fn prout_cdb(sa: u8, scope: u8, pr_type: u8) -> [u8; 10] {
    PrOutCdb {
        service_action: sa,
        scope,
        pr_type,
        parameter_list_length: PROUT_HEADER_SIZE as u32,
    }
    .encode()
}

/// The basic PR OUT parameter list with these keys and no flags.
pub fn basic_params(key: u64, sa_key: u64) -> [u8; PROUT_HEADER_SIZE] {
    let mut p = [0u8; PROUT_HEADER_SIZE];
    p[..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    p
}

/// The CDB of a PR IN reservd sends itself: the largest allocation length.
pub fn prin_cdb(sa: u8) -> [u8; 10] {
    PrInCdb {
        service_action: sa,
        allocation_length: reservd_proto::wire::DATA_SIZE as u16,
    }
    .encode()
}

fn is_unit_attention(a: &Answer) -> bool {
    a.status == Status::CHECK_CONDITION && a.sense_code().is_some_and(|c| c.key == 0x06)
}

fn good(a: &Answer) -> bool {
    a.status == Status::GOOD
}

impl Multipath {
    pub fn new(
        lib: Arc<dyn PersistLib>,
        devices: Arc<dyn MapDevices>,
        multipathd: Multipathd,
        diagnostics: Diagnostics,
        fixes: Fixes,
        tur_timeout_ms: u32,
    ) -> Multipath {
        Multipath {
            lib,
            devices,
            multipathd,
            diagnostics,
            fixes,
            tur_timeout_ms,
            orders: Mutex::new(HashMap::new()),
            keys: Mutex::new(HashMap::new()),
            stats: Arc::default(),
            registration_checks: false,
        }
    }

    /// Run `cmd` on the multipath map `dm-<minor>`.
    pub fn execute(&self, cmd: &Command<'_>, minor: u32) -> Result<Answer, BackendError> {
        match cmd.cdb[0] {
            PERSISTENT_RESERVE_IN => Ok(self.prin(cmd, minor)),
            PERSISTENT_RESERVE_OUT => Ok(match prout_request(cmd.cdb, cmd.params) {
                Ok(req) => {
                    let order = self.order(minor);
                    let _order = order.lock().unwrap_or_else(|e| e.into_inner());
                    let a = self.prout(cmd, &req, minor);
                    self.forget_key(minor);
                    if self.registration_checks {
                        stats::check_registrations(self, cmd.fd, minor);
                    }
                    a
                }
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
        let a = match self.prin_on_one_path(cmd.fd, sa, minor) {
            Some(a) => a,
            None => self.prin_library(cmd.fd, sa, minor),
        };
        if !good(&a) {
            return a;
        }
        Answer::good(self.as_one_nexus(sa, a.data, minor))
    }

    /// PR IN down the map, as libmpathpersist's own PR IN goes down one
    /// usable path: its data describe the whole LU, whichever path answers.
    /// Its data, or the device's refusal (ILLEGAL REQUEST, its own
    /// answer). `None`: no path answered (none active, or the command
    /// failed below SCSI), for the library to try each usable path.
    ///
    /// Only with an active path: with none, device-mapper would hold an
    /// SG_IO on a map that queues I/O until a path comes back.
    fn prin_on_one_path(&self, map: BorrowedFd<'_>, sa: u8, minor: u32) -> Option<Answer> {
        match self.devices.active_paths(map) {
            Ok(paths) if !paths.is_empty() => {}
            Ok(_) => {
                log::debug!("dm-{minor}: no active path: PR IN goes to libmpathpersist");
                return None;
            }
            Err(e) => {
                log::debug!(
                    "dm-{minor}: cannot list the map's paths ({e}): PR IN goes to libmpathpersist"
                );
                return None;
            }
        }
        let a = self.run(Via::Map(map), &prin_cdb(sa), &[]);
        if good(&a)
            || (a.status == Status::CHECK_CONDITION
                && a.sense_code().is_some_and(|s| s.key == 0x05))
        {
            return Some(a);
        }
        log::debug!(
            "dm-{minor}: PR IN service action {sa} on the map failed (status {:#04x}): it goes \
             to libmpathpersist",
            a.status.0
        );
        None
    }

    /// PR IN through libmpathpersist: the SPC-4 data, or the answer for
    /// its failure.
    fn prin_library(&self, fd: BorrowedFd<'_>, sa: u8, minor: u32) -> Answer {
        let (code, resp) = self.lib.reserve_in(fd, sa);
        self.stats.library(stats::Call::ReserveIn, code);
        log::debug!("dm-{minor}: PR IN service action {sa}: libmpathpersist returned {code}");
        if code != mpath::SUCCESS {
            return self.failure(fd, code, minor, None);
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

    /// READ KEYS and READ FULL STATUS with the map's registration listed
    /// once (one per path on the LU). multipathd is asked for the map's
    /// key only when a key is listed more than once; its answer is kept
    /// for [`KEY_CACHE_TTL`], or until a PR OUT on the map.
    fn as_one_nexus(&self, sa: u8, data: Vec<u8>, minor: u32) -> Vec<u8> {
        if !onenexus::repeats_a_key(sa, &data) {
            return data;
        }
        match self.cached_map_key(minor) {
            Ok(Some(own)) if sa == prin_sa::READ_KEYS => onenexus::read_keys_as_one(&data, own),
            Ok(Some(own)) => onenexus::full_status_as_one(&data, own),
            Ok(None) => data,
            Err(e) => {
                log::debug!(
                    "dm-{minor}: the map's key is unknown ({e}): its paths' registrations are \
                     all listed"
                );
                data
            }
        }
    }

    /// multipath-tools' key for the map, from the cache or multipathd.
    fn cached_map_key(&self, minor: u32) -> Result<Option<u64>, String> {
        let now = Instant::now();
        if let Some((key, at)) = self
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&minor)
        {
            if now.duration_since(*at) < KEY_CACHE_TTL {
                return Ok(*key);
            }
        }
        let key = self.devices.map_key(minor)?;
        self.keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(minor, (key, now));
        Ok(key)
    }

    /// Forget the cached key of a map whose registrations may have changed.
    fn forget_key(&self, minor: u32) {
        self.keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&minor);
    }

    /// The lock that keeps PR OUT commands on map `dm-<minor>` in order.
    fn order(&self, minor: u32) -> Arc<Mutex<()>> {
        self.orders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(minor)
            .or_default()
            .clone()
    }

    /// Run one of reservd's own commands, repeated past unit attentions.
    fn run(&self, via: Via<'_>, cdb: &[u8; 10], params: &[u8]) -> Answer {
        let mut a = self.devices.run(via, cdb, params);
        for _ in 1..UNIT_ATTENTION_TRIES {
            if !is_unit_attention(&a) {
                break;
            }
            a = self.devices.run(via, cdb, params);
        }
        a
    }

    /// What the LU says of the map: multipath-tools' key, the registered
    /// keys, the reservation. `None` if any of it cannot be read.
    fn state(&self, map: BorrowedFd<'_>, minor: u32) -> Option<MapState> {
        let map_key = match self.devices.map_key(minor) {
            Ok(k) => k,
            Err(e) => {
                log::warn!(
                    "dm-{minor}: cannot read the map's reservation key ({e}); the PR OUT goes \
                     to libmpathpersist unchecked"
                );
                return None;
            }
        };
        let read = |sa| {
            let a = self.run(Via::Map(map), &prin_cdb(sa), &[]);
            if good(&a) {
                Some(a.data)
            } else {
                log::warn!(
                    "dm-{minor}: PR IN service action {sa} on the map failed (status {:#04x}); \
                     the PR OUT goes to libmpathpersist unchecked",
                    a.status.0
                );
                None
            }
        };
        let keys = prin::parse_read_keys(&read(prin_sa::READ_KEYS)?).ok()?.1;
        let reservation = prin::parse_read_reservation(&read(prin_sa::READ_RESERVATION)?)
            .ok()?
            .1;
        Some(MapState {
            map_key,
            keys,
            reservation,
        })
    }

    fn prout(&self, cmd: &Command<'_>, req: &ProutRequest, minor: u32) -> Answer {
        let c = Prout::of(req);
        let state = self.state(cmd.fd, minor);
        let route = onenexus::route(&c, state.as_ref(), self.fixes);
        self.stats.route(&route);
        log::debug!(
            "dm-{minor}: PR OUT service action {} type {}: {state:?} -> {route:?}",
            c.service_action,
            c.pr_type
        );
        if matches!(
            c.service_action,
            prout_sa::RESERVE | prout_sa::PREEMPT | prout_sa::PREEMPT_AND_ABORT
        ) && onenexus::single_holder_type(c.pr_type)
        {
            log::warn!(
                "dm-{minor}: a reservation of type {} ({}) has one holder: only the path that \
                 reserves may {} (types 5 to 8 let every registered path of the map do so)",
                c.pr_type,
                reservd_proto::cdb::pr_type::name(c.pr_type),
                if c.pr_type == reservd_proto::cdb::pr_type::EXCLUSIVE_ACCESS {
                    "read or write"
                } else {
                    "write"
                }
            );
        }
        let cdb10: &[u8; 10] = cmd.cdb[..10].try_into().unwrap();
        match route {
            Route::Answer(a) => a,
            Route::OnePath => self.run(Via::Map(cmd.fd), cdb10, cmd.params),
            Route::Library => {
                let a = self.library(cmd.fd, req, minor);
                if c.service_action != prout_sa::RESERVE || good(&a) {
                    return a;
                }
                // libmpathpersist sends a RESERVE down the first path its
                // own TEST UNIT READY finds up, which may be one that just
                // came back and on which multipathd has not registered the
                // map's key yet (it puts the path back into device-mapper's
                // table only after that): the LU refuses a RESERVE from an
                // unregistered nexus (RESERVATION CONFLICT; LIO answers NOT
                // READY). Device-mapper's active paths carry the key: the
                // RESERVE goes once more, down the map. If that one
                // reserves, it is the map's answer; otherwise the library's
                // answer stands (the LU's own refusal: another node holds
                // the reservation, or the map is not registered).
                let again = self.run(Via::Map(cmd.fd), cdb10, cmd.params);
                if good(&again) {
                    log::info!(
                        "dm-{minor}: RESERVE through libmpathpersist failed (status {:#04x}); \
                         down the map's active paths it succeeded",
                        a.status.0
                    );
                    return again;
                }
                a
            }
            Route::LibraryRegister => self.library(cmd.fd, &register_ignoring_key(req), minor),
            Route::ReleaseOnPaths => self.release_on_paths(cmd.fd, &c, minor),
            Route::ReleaseThenUnregister => {
                let held = state
                    .as_ref()
                    .and_then(|s| Some((s.reservation?, s.own_key()?)));
                let Some((r, own)) = held else {
                    return self.library(cmd.fd, &register_ignoring_key(req), minor);
                };
                let release = Prout {
                    service_action: prout_sa::RELEASE,
                    scope: r.scope,
                    pr_type: r.pr_type,
                    key: own,
                    sa_key: 0,
                    spec_i_pt: false,
                };
                let a = self.release_on_paths(cmd.fd, &release, minor);
                if !good(&a) {
                    return a;
                }
                self.library(cmd.fd, &register_ignoring_key(req), minor)
            }
            Route::PreemptOwnPaths => self.preempt_own_paths(cmd.fd, cdb10, cmd.params, minor),
            Route::ChangeKeyHolding { old } => {
                let a = self.library(cmd.fd, &register_ignoring_key(req), minor);
                if good(&a) {
                    self.follow_key_change(cmd.fd, old, c.sa_key, minor);
                }
                a
            }
        }
    }

    /// The map's active paths; an empty list (and a log line) if they
    /// cannot be read.
    fn active_paths(&self, map: BorrowedFd<'_>, minor: u32) -> Vec<PathBuf> {
        match self.devices.active_paths(map) {
            Ok(p) => p,
            Err(e) => {
                log::error!("dm-{minor}: cannot list the map's paths: {e}");
                Vec::new()
            }
        }
    }

    /// RELEASE on every active path. A path that does not hold the
    /// reservation changes nothing (GOOD); the holder releases it, or
    /// refuses (a different type), and its answer is the map's. If the
    /// reservation is still there with the command's key, type and scope,
    /// a path that is down holds it: it is moved to an active path by
    /// PREEMPT and released there, with the map suspended.
    fn release_on_paths(&self, map: BorrowedFd<'_>, c: &Prout, minor: u32) -> Answer {
        let paths = self.active_paths(map, minor);
        if paths.is_empty() {
            return mpath::answer(mpath::DMMP_ERROR);
        }
        let cdb = prout_cdb(prout_sa::RELEASE, c.scope, c.pr_type);
        let params = basic_params(c.key, 0);
        // A refusal by CHECK CONDITION says more than a conflict (which a
        // path not registered yet may answer): keep the first of those.
        let mut refusal: Option<Answer> = None;
        for p in &paths {
            let a = self.run(Via::Path(p), &cdb, &params);
            if good(&a) {
                continue;
            }
            if a.status != Status::RESERVATION_CONFLICT
                && a.sense_code().is_none_or(|s| s.key != 0x05)
            {
                log::warn!(
                    "dm-{minor}: RELEASE on path {} failed (status {:#04x})",
                    p.display(),
                    a.status.0
                );
            }
            let better = match &refusal {
                None => true,
                Some(r) => {
                    r.status == Status::RESERVATION_CONFLICT && a.status == Status::CHECK_CONDITION
                }
            };
            if better {
                refusal = Some(a);
            }
        }
        let all_registrants = reservd_proto::cdb::pr_type::is_all_registrants;
        let r = match self.reservation(map) {
            Some(None) => return Answer::status(Status::GOOD),
            Some(Some(r)) => r,
            None => {
                log::warn!(
                    "dm-{minor}: cannot read the reservation back after RELEASE on every active path"
                );
                return refusal.unwrap_or(Answer::status(Status::GOOD));
            }
        };
        let the_maps = r.key == c.key || all_registrants(r.pr_type);
        if !the_maps {
            // Another node reserved meanwhile.
            return Answer::status(Status::GOOD);
        }
        if r.scope != c.scope || r.pr_type != c.pr_type {
            // The holder's refusal; if the holder is down, SPC-4's.
            return refusal.unwrap_or(Answer::check(SenseCode::INVALID_RELEASE));
        }
        log::info!(
            "dm-{minor}: the path holding the map's reservation is not active; moving the \
             reservation to an active path to release it"
        );
        self.suspended(map, minor, |paths| {
            let preempt = prout_cdb(prout_sa::PREEMPT, c.scope, c.pr_type);
            let (a, at) = self.on_a_registered_path(paths, &preempt, &basic_params(c.key, c.key));
            if !good(&a) {
                return a;
            }
            let holder = &paths[at];
            let a = self.run(Via::Path(holder), &cdb, &params);
            if !good(&a) {
                return a;
            }
            let others: Vec<PathBuf> = paths.iter().filter(|p| *p != holder).cloned().collect();
            self.register_again(&others, c.key, minor);
            Answer::status(Status::GOOD)
        })
    }

    /// Send a PR OUT down the first of `paths` that does not answer
    /// RESERVATION CONFLICT (a path not registered yet would); returns
    /// the answer and the index of the path that gave it.
    fn on_a_registered_path(
        &self,
        paths: &[PathBuf],
        cdb: &[u8; 10],
        params: &[u8],
    ) -> (Answer, usize) {
        let mut last = (Answer::status(Status::RESERVATION_CONFLICT), 0);
        for (i, p) in paths.iter().enumerate() {
            let a = self.run(Via::Path(p), cdb, params);
            if a.status != Status::RESERVATION_CONFLICT {
                return (a, i);
            }
            last = (a, i);
        }
        last
    }

    /// READ RESERVATION on the map: `None` if it fails.
    fn reservation(&self, map: BorrowedFd<'_>) -> Option<Option<prin::Reservation>> {
        let a = self.run(Via::Map(map), &prin_cdb(prin_sa::READ_RESERVATION), &[]);
        if !good(&a) {
            return None;
        }
        prin::parse_read_reservation(&a.data).ok().map(|(_, r)| r)
    }

    /// Run `f` on the map's active paths with the map suspended; resumes
    /// it whatever happens (also when `f` panics).
    fn suspended(
        &self,
        map: BorrowedFd<'_>,
        minor: u32,
        f: impl FnOnce(&[PathBuf]) -> Answer,
    ) -> Answer {
        let paths = self.active_paths(map, minor);
        if paths.is_empty() {
            return mpath::answer(mpath::DMMP_ERROR);
        }
        if let Err(e) = self.devices.suspend(map) {
            log::error!(
                "dm-{minor}: cannot suspend the map ({e}): refusing a command that would leave \
                 its other paths without the map's key meanwhile"
            );
            return mpath::answer(mpath::DMMP_ERROR);
        }
        struct Resume<'a, 'b> {
            devices: &'a dyn MapDevices,
            map: BorrowedFd<'b>,
            minor: u32,
        }
        impl Drop for Resume<'_, '_> {
            fn drop(&mut self) {
                if let Err(e) = self.devices.resume(self.map) {
                    log::error!(
                        "dm-{}: cannot resume the map: {e}; I/O to it stays queued until it is \
                         resumed (dmsetup resume)",
                        self.minor
                    );
                }
            }
        }
        let _resume = Resume {
            devices: self.devices.as_ref(),
            map,
            minor,
        };
        f(&paths)
    }

    /// REGISTER AND IGNORE EXISTING KEY with `key` on each of `paths`
    /// (those the map's key must be back on).
    fn register_again(&self, paths: &[PathBuf], key: u64, minor: u32) {
        let cdb = prout_cdb(prout_sa::REGISTER_AND_IGNORE, 0, 0);
        for p in paths {
            let a = self.run(Via::Path(p), &cdb, &basic_params(0, key));
            if !good(&a) {
                log::error!(
                    "dm-{minor}: cannot register the map's key again on path {} (status \
                     {:#04x}); multipathd registers it when the path is checked again",
                    p.display(),
                    a.status.0
                );
            }
        }
    }

    /// A PREEMPT that removes the map's key from its other paths (its own
    /// key, or zero on an all-registrants reservation): sent down one
    /// active path with the map suspended; then, if that path still holds
    /// the map's key, the key is registered again on the others.
    fn preempt_own_paths(
        &self,
        map: BorrowedFd<'_>,
        cdb: &[u8; 10],
        params: &[u8],
        minor: u32,
    ) -> Answer {
        let key = u64::from_be_bytes(params[0..8].try_into().unwrap());
        self.suspended(map, minor, |paths| {
            let (a, at) = self.on_a_registered_path(paths, cdb, params);
            if !good(&a) {
                return a;
            }
            let sender = &paths[at];
            let others: Vec<PathBuf> = paths.iter().filter(|p| *p != sender).cloned().collect();
            let still = self.run(Via::Path(sender), &prin_cdb(prin_sa::READ_KEYS), &[]);
            let kept = good(&still)
                && prin::parse_read_keys(&still.data).is_ok_and(|(_, keys, _)| keys.contains(&key));
            if kept {
                self.register_again(&others, key, minor);
            } else {
                log::info!(
                    "dm-{minor}: the PREEMPT removed the map's own registration too; its other \
                     paths stay unregistered"
                );
            }
            a
        })
    }

    /// After a key change from `old` to `new` while the map held the
    /// reservation: if the reservation still carries `old`, a path that
    /// missed the change (down) holds it; move it to the new key.
    fn follow_key_change(&self, map: BorrowedFd<'_>, old: u64, new: u64, minor: u32) {
        let Some(Some(r)) = self.reservation(map) else {
            return;
        };
        if r.key != old {
            return;
        }
        log::info!(
            "dm-{minor}: a path that missed the key change holds the reservation; moving it to \
             the new key"
        );
        let cdb = prout_cdb(prout_sa::PREEMPT, r.scope, r.pr_type);
        let a = self.run(Via::Map(map), &cdb, &basic_params(new, old));
        if !good(&a) {
            log::error!(
                "dm-{minor}: moving the reservation to the new key failed (status {:#04x})",
                a.status.0
            );
        }
    }

    /// A PR OUT through libmpathpersist.
    fn library(&self, fd: BorrowedFd<'_>, req: &ProutRequest, minor: u32) -> Answer {
        let mut code = self.lib.reserve_out(fd, req);
        self.stats.library(stats::Call::ReserveOut, code);
        // When a path fails under libmpathpersist while it registers (its
        // device set offline between the library's look at the paths and
        // its command to it: the open or the SG_IO fails), the library
        // reports that path's failure, although the others registered. A
        // REGISTER AND IGNORE EXISTING KEY done twice changes nothing: once
        // more, the library finds that path down and skips it.
        if req.service_action == prout_sa::REGISTER_AND_IGNORE && failed_below_scsi(code) {
            log::info!(
                "dm-{minor}: REGISTER AND IGNORE EXISTING KEY through libmpathpersist failed \
                 below SCSI ({code}); once more"
            );
            code = self.lib.reserve_out(fd, req);
            self.stats.library(stats::Call::ReserveOut, code);
        }
        log::debug!(
            "dm-{minor}: PR OUT service action {} type {}: libmpathpersist returned {code}",
            req.service_action,
            req.pr_type
        );
        if code == mpath::SUCCESS {
            Answer::status(Status::GOOD)
        } else {
            self.failure(fd, code, minor, Some(req))
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
        let order = self.order(minor);
        let _order = order.lock().unwrap_or_else(|e| e.into_inner());
        let a = self.library(fd, &ProutRequest::unregister(), minor);
        self.forget_key(minor);
        Ok(a)
    }

    /// The answer for a failed library call, with the warning that explains
    /// the likely cause. `req`: the PR OUT, if it was one.
    fn failure(
        &self,
        fd: BorrowedFd<'_>,
        code: i32,
        minor: u32,
        req: Option<&ProutRequest>,
    ) -> Answer {
        match code {
            mpath::SYNTAX_ERROR => {
                let why = if self.diagnostics.key_config.is_empty() {
                    "the command's keys differ from the reservation_key multipath-tools has for \
                     this map (multipath.conf, or /etc/multipath/prkeys with 'reservation_key file')"
                        .to_string()
                } else {
                    self.diagnostics.key_config.join("; ")
                };
                if req.is_some() {
                    // The key checks of the one-nexus rule passed: the key
                    // is the guest's own, and the host's configuration
                    // does not allow it.
                    log::error!(
                        "dm-{minor}: libmpathpersist refused the guest's key: {why}; answering \
                         ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST (guests choose their \
                         own keys: set 'reservation_key file' in multipath.conf)"
                    );
                    return Answer::check(SenseCode::INVALID_PARAM);
                }
                log::warn!("dm-{minor}: libmpathpersist refused the command: {why}");
            }
            mpath::DMMP_ERROR => {
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
            mpath::FILE_ERROR if self.diagnostics.non_root => log::warn!(
                "dm-{minor}: libmpathpersist could not open a path device: reservd runs as a \
                 non-root user (-u)"
            ),
            // ILLEGAL REQUEST changed nothing: the device says what was
            // wrong when the command goes down one path (the library keeps
            // only the sense key).
            mpath::ILLEGAL_REQ => {
                if let Some(req) = req {
                    let (cdb, params) = encode_prout(req);
                    let a = self.run(Via::Map(fd), &cdb, &params);
                    if a.sense_code().is_some_and(|s| s.key == 0x05) {
                        return a;
                    }
                }
            }
            _ => {}
        }
        if mpath::wants_tur(code) {
            let (tur, _) = sg_io(fd, &TEST_UNIT_READY, Transfer::None, self.tur_timeout_ms);
            if tur.status != Status::GOOD {
                return tur;
            }
        }
        mpath::answer(code)
    }
}

/// Whether a libmpathpersist code stands for a failure that is no answer of
/// the device: a path device it could not open, an SG_IO that failed (0.9.4
/// returns -1), a transport error, a thread it could not start.
fn failed_below_scsi(code: i32) -> bool {
    code < 0 || matches!(code, mpath::FILE_ERROR | mpath::OTHER | mpath::THREAD_ERROR)
}

/// `req` as REGISTER AND IGNORE EXISTING KEY with the same SERVICE ACTION
/// RESERVATION KEY and flags: for registrations whose key reservd checked.
fn register_ignoring_key(req: &ProutRequest) -> ProutRequest {
    let mut r = req.clone();
    r.service_action = prout_sa::REGISTER_AND_IGNORE;
    r
}

/// The CDB and basic parameter list of `req` (without TransportIDs).
fn encode_prout(req: &ProutRequest) -> ([u8; 10], Vec<u8>) {
    let cdb = prout_cdb(req.service_action, req.scope, req.pr_type);
    (cdb, req.header.to_vec())
}

/// Loads the multipath side: libmpathpersist and its diagnostics.
pub type Loader = Box<dyn FnOnce() -> Option<Multipath> + Send>;

/// The outcome of loading libmpathpersist.
pub struct Loaded {
    pub multipath: Option<Multipath>,
    /// For the log: "active (multipath-tools 0.9.4, /lib/...)" or
    /// "inactive, ...".
    pub summary: String,
    /// Warnings to log once.
    pub warnings: Vec<String>,
    /// What reservd does itself for this library, for the log.
    pub fixes: Vec<&'static str>,
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
    /// setup. Only with device-mapper present (`dm` opened): libmultipath
    /// exits the process when it cannot reach it. `runs_as_root`: whether
    /// reservd keeps uid 0; `stderr_is_journal`: whether its stderr is the
    /// systemd journal (multipath-tools' messages then go to syslog).
    pub fn load(
        dm: Arc<DmControl>,
        runs_as_root: bool,
        sgio_timeout_ms: u32,
        stderr_is_journal: bool,
    ) -> Loaded {
        // libmultipath's verbosity: the levels it formats at all (0
        // errors, 1 warnings, 2 notices, 3 info, 4 debug), as far as
        // reservd's log shows them (see syslog).
        let verbose = match log::max_level() {
            log::LevelFilter::Trace => 4,
            log::LevelFilter::Debug => 3,
            log::LevelFilter::Info => 2,
            log::LevelFilter::Warn => 1,
            _ => 0,
        };
        let lib = match Libmpathpersist::load(mpath_sys::DEFAULT_LIBRARY, verbose) {
            Ok(lib) => {
                lib.log_to_syslog(stderr_is_journal);
                lib
            }
            Err(e) => {
                return Loaded {
                    multipath: None,
                    summary: no_library(&e),
                    warnings: Vec::new(),
                    fixes: Vec::new(),
                }
            }
        };
        let summary = format!(
            "active (multipath-tools {}, {})",
            lib.version_string(),
            lib.path().unwrap_or(mpath_sys::DEFAULT_LIBRARY)
        );
        let fixes = Fixes::for_version(lib.version());
        let mut warnings = Vec::new();
        if !lib.concurrent() {
            warnings.push(
                "this libmpathpersist is older than multipath-tools 0.8.6: it is called for one \
                 map at a time, so a map whose paths hang delays the other maps' commands"
                    .to_string(),
            );
        }
        let key_config = reservd_proto::mpconf::diagnose(&read_key_config(), lib.version());
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
        let devices = Arc::new(HostMaps {
            dm,
            multipathd: multipathd.clone().with_timeout(Duration::from_secs(10)),
            sgio: SgIo {
                timeout_ms: sgio_timeout_ms,
            },
        });
        Loaded {
            multipath: Some(Multipath::new(
                Arc::new(lib),
                devices,
                multipathd,
                Diagnostics {
                    key_config,
                    non_root: !runs_as_root,
                },
                fixes,
                sgio_timeout_ms,
            )),
            summary,
            warnings,
            fixes: fixes.describe(),
        }
    }

    /// Log the outcome: the summary, what reservd does itself, then the
    /// warnings.
    pub fn log(&self) {
        log::info!("multipath support: {}", self.summary);
        for f in &self.fixes {
            log::info!("multipath: for this libmpathpersist, reservd does itself: {f}");
        }
        for w in &self.warnings {
            log::warn!("{w}");
        }
    }
}

/// `reservation_key` settings from /etc/multipath.conf and
/// /etc/multipath/conf.d/*.conf.
pub fn read_key_config() -> reservd_proto::mpconf::KeyConfig {
    let mut cfg = reservd_proto::mpconf::KeyConfig::default();
    if let Ok(t) = std::fs::read_to_string("/etc/multipath.conf") {
        cfg = reservd_proto::mpconf::parse(&t);
    }
    if let Ok(dir) = std::fs::read_dir("/etc/multipath/conf.d") {
        let mut files: Vec<_> = dir
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "conf"))
            .collect();
        files.sort();
        for f in files {
            if let Ok(t) = std::fs::read_to_string(&f) {
                cfg.merge(reservd_proto::mpconf::parse(&t));
            }
        }
    }
    cfg
}
