//! The multipath backend on a simulated map (the test kit's [`SimMap`]:
//! the in-memory SPC-4 target behind two paths, and a libmpathpersist that
//! behaves as multipath-tools 0.9.4's): the map answers as one I_T nexus.

use std::os::fd::AsFd;
use std::sync::Arc;

use reservd_daemon::backend::multipath::library::PersistLib;
use reservd_daemon::backend::multipath::multipathd::Multipathd;
use reservd_daemon::backend::multipath::{
    basic_params, prin_cdb, prout_cdb, Diagnostics, MapDevices, Multipath,
};
use reservd_daemon::backend::Command;
use reservd_proto::cdb::prout_sa::*;
use reservd_proto::cdb::{pad16, prin_sa};
use reservd_proto::mpath;
use reservd_proto::mpath_xlate::prout_request;
use reservd_proto::onenexus::Fixes;
use reservd_proto::prin;
use reservd_proto::sense::{Answer, SenseCode, Status};
use reservd_testkit::sim::{SimMap, NODE2};

const K: u64 = 0xaaaa;
const OTHER: u64 = 0xbbbb;

fn multipath(sim: &Arc<SimMap>, fixes: Fixes) -> Multipath {
    Multipath::new(
        Arc::clone(sim) as Arc<dyn PersistLib>,
        Arc::clone(sim) as Arc<dyn MapDevices>,
        Multipathd::from_env_value(Some("/nonexistent/reservd-test/multipathd.socket")),
        Diagnostics::default(),
        fixes,
        1000,
    )
}

/// A PR OUT through reservd on the map.
fn out(m: &Multipath, sim: &SimMap, sa: u8, t: u8, key: u64, sa_key: u64) -> Answer {
    out_to(m, sim, 7, sa, t, key, sa_key)
}

/// A PR OUT through reservd on `sim` as map `dm-<minor>`.
fn out_to(m: &Multipath, sim: &SimMap, minor: u32, sa: u8, t: u8, key: u64, sa_key: u64) -> Answer {
    let cdb = pad16(&prout_cdb(sa, 0, t));
    m.execute(
        &Command {
            nexus: 1,
            peer: None,
            fd: sim.lu.as_fd(),
            cdb: &cdb,
            params: &basic_params(key, sa_key),
        },
        minor,
    )
    .unwrap()
}

fn prin(m: &Multipath, sim: &SimMap, sa: u8) -> Answer {
    let cdb = pad16(&prin_cdb(sa));
    m.execute(
        &Command {
            nexus: 1,
            peer: None,
            fd: sim.lu.as_fd(),
            cdb: &cdb,
            params: &[],
        },
        7,
    )
    .unwrap()
}

fn conflict() -> Answer {
    Answer::status(Status::RESERVATION_CONFLICT)
}

fn ok() -> Answer {
    Answer::status(Status::GOOD)
}

/// Node 2 registers OTHER and holds a type 5 reservation; the map
/// (two paths) registers K through reservd.
fn two_nodes(m: &Multipath, sim: &SimMap) {
    assert_eq!(sim.out(NODE2, REGISTER, 0, 0, OTHER), ok());
    assert_eq!(sim.out(NODE2, RESERVE, 5, OTHER, 0), ok());
    assert_eq!(out(m, sim, REGISTER, 0, 0, K), ok());
    assert_eq!(sim.keys(NODE2), vec![OTHER, K, K]);
}

#[test]
fn release_by_a_non_holder_keeps_the_other_nodes_reservation() {
    // Without the one-nexus rule: the 0.9.4 library's fallback
    // clears the LU (the bug this guards against).
    let sim = SimMap::new(2);
    let m = multipath(&sim, Fixes::ALL);
    two_nodes(&m, &sim);
    let req = prout_request(&pad16(&prout_cdb(RELEASE, 0, 5)), &basic_params(K, 0)).unwrap();
    assert_eq!(sim.reserve_out(sim.lu.as_fd(), &req), mpath::SUCCESS);
    assert_eq!(sim.reservation(NODE2), None, "the library keeps it?");
    // With it.
    let sim = SimMap::new(2);
    let m = multipath(&sim, Fixes::ALL);
    two_nodes(&m, &sim);
    sim.take_events();
    assert_eq!(out(&m, &sim, RELEASE, 5, K, 0), ok());
    assert_eq!(
        sim.reservation(NODE2).map(|r| (r.key, r.pr_type)),
        Some((OTHER, 5))
    );
    assert_eq!(sim.keys(NODE2), vec![OTHER, K, K]);
    // One RELEASE down one path, no library call.
    assert_eq!(sim.take_events(), vec!["sg 2 on 1"]);
}

#[test]
fn a_reserve_the_library_sends_down_a_path_not_registered_yet_goes_down_the_map() {
    let sim = SimMap::new(2);
    let m = multipath(&sim, Fixes::ALL);
    assert_eq!(sim.out(NODE2, REGISTER, 0, 0, OTHER), ok());
    assert_eq!(out(&m, &sim, REGISTER, 0, 0, K), ok());
    // Path 1 fails; node 2 fences the map, which registers again
    // (through path 2 only).
    sim.set_active(0, false);
    assert_eq!(sim.out(NODE2, PREEMPT, 5, OTHER, K), ok());
    assert_eq!(out(&m, &sim, REGISTER, 0, 0, K), ok());
    assert!(!sim.registered(1) && sim.registered(2));
    // Path 1 is back before multipathd registered the key on it: the
    // library sends the RESERVE down it, and the LU refuses.
    sim.set_returning(0, true);
    sim.take_events();
    assert_eq!(out(&m, &sim, RESERVE, 5, K, 0), ok());
    let r = sim.reservation(NODE2).unwrap();
    assert_eq!((r.key, r.pr_type), (K, 5));
    assert_eq!(sim.take_events(), vec!["lib 1 on 1", "sg 1 on 2"]);
    // A refusal that is the LU's: node 2 holds the reservation.
    assert_eq!(out(&m, &sim, RELEASE, 5, K, 0), ok());
    // (node 2 first takes its unit attention, RESERVATIONS RELEASED)
    let mut a = sim.out(NODE2, RESERVE, 5, OTHER, 0);
    if a.status == Status::CHECK_CONDITION && a.sense_code().is_some_and(|c| c.key == 0x06) {
        a = sim.out(NODE2, RESERVE, 5, OTHER, 0);
    }
    assert_eq!(a, ok());
    sim.take_events();
    assert_eq!(out(&m, &sim, RESERVE, 5, K, 0), conflict());
    assert_eq!(
        sim.reservation(NODE2).map(|r| (r.key, r.pr_type)),
        Some((OTHER, 5))
    );
}

#[test]
fn a_path_failing_under_the_library_while_it_registers_is_no_failure() {
    let sim = SimMap::new(2);
    let m = multipath(&sim, Fixes::ALL);
    *sim.fails_under_library.lock().unwrap() = Some(0);
    assert_eq!(out(&m, &sim, REGISTER, 0, 0, K), ok());
    assert_eq!(sim.keys(NODE2), vec![K]);
    assert!(!sim.registered(1) && sim.registered(2));
    // The library's second call no longer sees path 1.
    assert_eq!(
        sim.take_events(),
        vec!["lib 6 on 1", "lib 6 on 2", "lib 6 on 2"]
    );
    assert_eq!(*sim.prkey.lock().unwrap(), Some(K));
    // The metrics count both calls.
    assert_eq!(
        m.stats.library_counts(),
        vec![
            (
                reservd_daemon::backend::multipath::stats::Call::ReserveOut,
                "SUCCESS",
                1
            ),
            (
                reservd_daemon::backend::multipath::stats::Call::ReserveOut,
                "FILE_ERROR",
                1
            ),
        ]
    );
}

#[test]
fn self_preempt_keeps_every_path_registered() {
    let sim = SimMap::new(2);
    let m = multipath(&sim, Fixes::ALL);
    assert_eq!(out(&m, &sim, REGISTER, 0, 0, K), ok());
    assert_eq!(out(&m, &sim, RESERVE, 5, K, 0), ok());
    sim.take_events();
    // Change the type by preempting oneself.
    assert_eq!(out(&m, &sim, PREEMPT, 6, K, K), ok());
    assert!(sim.registered(1) && sim.registered(2));
    assert_eq!(sim.keys(NODE2), vec![K, K]);
    let r = sim.reservation(NODE2).unwrap();
    assert_eq!((r.key, r.pr_type), (K, 6));
    // The PREEMPT and the registration again ran while suspended (the
    // first REGISTER AND IGNORE met path 2's unit attention,
    // REGISTRATIONS PREEMPTED, and was sent again).
    assert_eq!(
        sim.take_events(),
        vec!["suspend", "sg 4 on 1", "sg 6 on 2", "sg 6 on 2", "resume"]
    );
    // With a library that does it itself, the library is called.
    let sim = SimMap::new(2);
    let m = multipath(&sim, Fixes::NONE);
    assert_eq!(out(&m, &sim, REGISTER, 0, 0, K), ok());
    assert_eq!(out(&m, &sim, RESERVE, 5, K, 0), ok());
    sim.take_events();
    assert_eq!(out(&m, &sim, PREEMPT, 6, K, K), ok());
    assert_eq!(sim.take_events(), vec!["lib 4 on 1"]);
}

#[test]
fn preempting_an_all_registrants_reservation_keeps_the_maps_paths() {
    let sim = SimMap::new(2);
    let m = multipath(&sim, Fixes::ALL);
    assert_eq!(sim.out(NODE2, REGISTER, 0, 0, OTHER), ok());
    assert_eq!(out(&m, &sim, REGISTER, 0, 0, K), ok());
    assert_eq!(out(&m, &sim, RESERVE, 7, K, 0), ok());
    // Zero: every other registration goes, node 2's included.
    assert_eq!(out(&m, &sim, PREEMPT, 5, K, 0), ok());
    assert_eq!(sim.keys(1), vec![K, K]);
    let r = sim.reservation(1).unwrap();
    assert_eq!((r.key, r.pr_type), (K, 5));
}

#[test]
fn register_with_a_wrong_key_is_a_reservation_conflict() {
    let sim = SimMap::new(2);
    let m = multipath(&sim, Fixes::ALL);
    assert_eq!(out(&m, &sim, REGISTER, 0, 0, K), ok());
    sim.take_events();
    assert_eq!(out(&m, &sim, REGISTER, 0, 0x9999, 0x1111), conflict());
    assert!(sim.take_events().is_empty(), "nothing sent");
    // From an unregistered map too.
    let sim = SimMap::new(2);
    let m = multipath(&sim, Fixes::ALL);
    assert_eq!(out(&m, &sim, REGISTER, 0, 0x9999, 0x1111), conflict());
    assert_eq!(sim.keys(NODE2), Vec::<u64>::new());
}

#[test]
fn refused_commands_get_the_devices_answer() {
    let sim = SimMap::new(2);
    let m = multipath(&sim, Fixes::ALL);
    assert_eq!(out(&m, &sim, REGISTER, 0, 0, K), ok());
    // A wrong key: the device's conflict, not the library's error.
    assert_eq!(out(&m, &sim, RESERVE, 5, 0x9999, 0), conflict());
    // An invalid type: the device's ILLEGAL REQUEST, INVALID FIELD IN
    // CDB (the library keeps only the sense key).
    assert_eq!(
        out(&m, &sim, RESERVE, 2, K, 0),
        Answer::check(SenseCode::INVALID_FIELD)
    );
    // PREEMPT with key 0 of a reservation that is not all registrants.
    assert_eq!(out(&m, &sim, RESERVE, 5, K, 0), ok());
    assert_eq!(
        out(&m, &sim, PREEMPT, 5, K, 0),
        Answer::check(SenseCode::INVALID_PARAM)
    );
    // An unregistered map's RESERVE.
    let sim = SimMap::new(2);
    let m = multipath(&sim, Fixes::ALL);
    assert_eq!(out(&m, &sim, RESERVE, 5, K, 0), conflict());
}

#[test]
fn release_with_a_wrong_key_while_holding_through_another_path() {
    let sim = SimMap::new(2);
    let m = multipath(&sim, Fixes::ALL);
    assert_eq!(out(&m, &sim, REGISTER, 0, 0, K), ok());
    sim.set_active(0, false);
    assert_eq!(out(&m, &sim, RESERVE, 5, K, 0), ok());
    sim.set_active(0, true);
    // Path 1 (where the kernel sends it) is not the holder.
    assert_eq!(out(&m, &sim, RELEASE, 5, 0x9999, 0), conflict());
    assert_eq!(sim.reservation(1).map(|r| r.key), Some(K));
}

#[test]
fn reserve_again_while_holding_through_another_path() {
    let sim = SimMap::new(2);
    let m = multipath(&sim, Fixes::ALL);
    assert_eq!(out(&m, &sim, REGISTER, 0, 0, K), ok());
    // Reserve through path 2 (path 1 down), then path 1 comes back.
    sim.set_active(0, false);
    assert_eq!(out(&m, &sim, RESERVE, 5, K, 0), ok());
    sim.set_active(0, true);
    // Path 1 does not hold it; the map does.
    assert_eq!(sim.out(1, RESERVE, 5, K, 0), conflict());
    assert_eq!(out(&m, &sim, RESERVE, 5, K, 0), ok());
    assert_eq!(out(&m, &sim, RESERVE, 6, K, 0), conflict());
}

#[test]
fn release_when_the_holding_path_is_down() {
    let sim = SimMap::new(2);
    let m = multipath(&sim, Fixes::ALL);
    assert_eq!(sim.out(NODE2, REGISTER, 0, 0, OTHER), ok());
    assert_eq!(out(&m, &sim, REGISTER, 0, 0, K), ok());
    assert_eq!(out(&m, &sim, RESERVE, 5, K, 0), ok());
    // The holder (path 1) goes down.
    sim.set_active(0, false);
    sim.take_events();
    assert_eq!(out(&m, &sim, RELEASE, 5, K, 0), ok());
    assert_eq!(sim.reservation(NODE2), None);
    // Node 2 kept its registration; path 2 is registered.
    let keys = sim.keys(NODE2);
    assert!(keys.contains(&OTHER), "{keys:?}");
    assert!(sim.registered(2));
    assert_eq!(
        sim.take_events(),
        vec!["sg 2 on 2", "suspend", "sg 4 on 2", "sg 2 on 2", "resume"]
    );
    // The holder's refusal of another type.
    let sim = SimMap::new(2);
    let m = multipath(&sim, Fixes::ALL);
    assert_eq!(out(&m, &sim, REGISTER, 0, 0, K), ok());
    assert_eq!(out(&m, &sim, RESERVE, 5, K, 0), ok());
    assert_eq!(
        out(&m, &sim, RELEASE, 6, K, 0),
        Answer::check(SenseCode::INVALID_RELEASE)
    );
    assert!(sim.reservation(1).is_some());
    assert_eq!(out(&m, &sim, RELEASE, 5, K, 0), ok());
    assert_eq!(sim.reservation(1), None);
}

#[test]
fn unregistering_while_holding_through_a_down_path_releases() {
    let sim = SimMap::new(2);
    let m = multipath(&sim, Fixes::ALL);
    assert_eq!(out(&m, &sim, REGISTER, 0, 0, K), ok());
    assert_eq!(out(&m, &sim, RESERVE, 5, K, 0), ok());
    sim.set_active(0, false);
    assert_eq!(out(&m, &sim, REGISTER, 0, K, 0), ok());
    assert_eq!(sim.reservation(NODE2), None);
    assert!(!sim.registered(2));
    // The down path lost its registration too (moved, then released).
    assert!(!sim.registered(1));
    assert_eq!(*sim.prkey.lock().unwrap(), None);
}

#[test]
fn a_key_change_follows_a_reservation_held_by_a_down_path() {
    let sim = SimMap::new(2);
    let m = multipath(&sim, Fixes::ALL);
    assert_eq!(out(&m, &sim, REGISTER, 0, 0, K), ok());
    assert_eq!(out(&m, &sim, RESERVE, 5, K, 0), ok());
    sim.set_active(0, false);
    assert_eq!(out(&m, &sim, REGISTER, 0, K, 0x77), ok());
    let r = sim.reservation(2).unwrap();
    assert_eq!((r.key, r.pr_type), (0x77, 5));
    assert_eq!(*sim.prkey.lock().unwrap(), Some(0x77));
}

#[test]
fn read_keys_lists_the_maps_registration_once() {
    let sim = SimMap::new(2);
    let m = multipath(&sim, Fixes::ALL);
    two_nodes(&m, &sim);
    let a = prin(&m, &sim, prin_sa::READ_KEYS);
    assert_eq!(prin::parse_read_keys(&a.data).unwrap().1, vec![OTHER, K]);
    // When multipathd cannot say which key is the map's: all of them.
    let mut unknown = SimMap::new(2);
    Arc::get_mut(&mut unknown).unwrap().multipathd_up = false;
    let m = multipath(&unknown, Fixes::ALL);
    assert_eq!(unknown.out(1, REGISTER, 0, 0, K), ok());
    assert_eq!(unknown.out(2, REGISTER, 0, 0, K), ok());
    let a = prin(&m, &unknown, prin_sa::READ_KEYS);
    assert_eq!(prin::parse_read_keys(&a.data).unwrap().1, vec![K, K]);
}

#[test]
fn without_multipathd_release_still_runs_on_the_paths() {
    let mut sim = SimMap::new(2);
    Arc::get_mut(&mut sim).unwrap().multipathd_up = false;
    let m = multipath(&sim, Fixes::ALL);
    assert_eq!(sim.out(NODE2, REGISTER, 0, 0, OTHER), ok());
    assert_eq!(sim.out(NODE2, RESERVE, 5, OTHER, 0), ok());
    assert_eq!(sim.out(1, REGISTER, 0, 0, K), ok());
    assert_eq!(sim.out(2, REGISTER, 0, 0, K), ok());
    sim.take_events();
    assert_eq!(out(&m, &sim, RELEASE, 5, K, 0), ok());
    assert_eq!(sim.reservation(NODE2).map(|r| r.key), Some(OTHER));
    assert_eq!(sim.take_events(), vec!["sg 2 on 1", "sg 2 on 2"]);
}

#[test]
fn a_fenced_map_is_unregistered_for_its_guest() {
    let sim = SimMap::new(2);
    let m = multipath(&sim, Fixes::ALL);
    two_nodes(&m, &sim);
    // Node 2 preempts the map's key: every path of the map loses it.
    assert_eq!(sim.out(NODE2, PREEMPT, 5, OTHER, K), ok());
    // multipathd still has K; the guest's commands with K conflict as
    // from an unregistered nexus.
    assert_eq!(*sim.prkey.lock().unwrap(), Some(K));
    assert_eq!(out(&m, &sim, RESERVE, 5, K, 0), conflict());
    assert_eq!(out(&m, &sim, REGISTER, 0, K, K), conflict());
    // It may register again, ignoring the key.
    assert_eq!(out(&m, &sim, REGISTER_AND_IGNORE, 0, 0, K), ok());
    assert!(sim.registered(1) && sim.registered(2));
}

/// What the metrics read: libmpathpersist's return codes per call, and
/// the route each PR OUT took.
#[test]
fn library_outcomes_and_routes_are_counted() {
    use reservd_daemon::backend::multipath::stats::Call;
    let sim = SimMap::new(2);
    let m = multipath(&sim, Fixes::ALL);
    assert_eq!(out(&m, &sim, REGISTER, 0, 0, K), ok());
    assert_eq!(out(&m, &sim, RESERVE, 5, K, 0), ok());
    // A registration with a wrong key: answered by reservd, nothing sent.
    assert_eq!(out(&m, &sim, REGISTER, 0, OTHER, 0x1111), conflict());
    // A RESERVE with one: down one path, the device refuses it.
    assert_eq!(out(&m, &sim, RESERVE, 5, OTHER, 0), conflict());
    assert_eq!(prin(&m, &sim, prin_sa::READ_KEYS).status, Status::GOOD);
    assert_eq!(out(&m, &sim, RELEASE, 5, K, 0), ok());
    let routes: Vec<(&str, u64)> = m
        .stats
        .route_counts()
        .into_iter()
        .filter(|r| r.1 > 0)
        .collect();
    assert_eq!(
        routes,
        vec![
            ("answer", 1),
            ("one_path", 1),
            ("library", 1),
            ("library_register", 1),
            ("release_on_paths", 1)
        ]
    );
    // The READ KEYS went down the map, not through the library.
    assert_eq!(
        m.stats.library_counts(),
        vec![(Call::ReserveOut, "SUCCESS", 2)]
    );
    // Registration checks are off unless the metrics turn them on.
    assert!(m.stats.maps().is_empty());
}

/// With registration checks on, each PR OUT on a map is followed by one
/// READ KEYS on the map, whose count says whether every active path holds
/// the map's key; PR IN adds no command.
#[test]
fn a_pr_out_counts_the_maps_registrations() {
    let sim = SimMap::new(2);
    let mut m = multipath(&sim, Fixes::ALL);
    m.registration_checks = true;
    // Before any registration: no key, nothing lacking.
    assert_eq!(out(&m, &sim, REGISTER, 0, 0, K), ok());
    let check = |m: &Multipath| {
        let maps = m.stats.maps();
        assert_eq!(maps.len(), 1);
        // The simulated LU is a regular file: the map is named by minor.
        assert_eq!(
            (maps[0].name.as_str(), maps[0].wwid.as_deref()),
            ("dm-7", None)
        );
        maps[0].outcome.clone().unwrap()
    };
    let c = check(&m);
    assert_eq!(
        (
            c.active_paths,
            c.registered,
            c.key_registrations,
            c.paths_lacking_key()
        ),
        (2, true, 2, 0)
    );
    // Path 2's nexus loses its registration behind reservd's back: the
    // next PR OUT finds one registration for two paths.
    assert_eq!(sim.out(2, REGISTER, 0, K, 0), ok());
    assert_eq!(out(&m, &sim, RESERVE, 5, K, 0), ok());
    let c = check(&m);
    assert_eq!((c.key_registrations, c.paths_lacking_key()), (1, 1));
    // Path 2 fails: one active path, which holds the key.
    sim.set_active(1, false);
    assert_eq!(out(&m, &sim, RELEASE, 5, K, 0), ok());
    let c = check(&m);
    assert_eq!((c.active_paths, c.paths_lacking_key()), (1, 0));
    sim.set_active(1, true);
    // Unregistered: no key, nothing lacking.
    assert_eq!(out(&m, &sim, REGISTER, 0, K, 0), ok());
    let c = check(&m);
    assert_eq!(
        (c.registered, c.key_registrations, c.paths_lacking_key()),
        (false, 0, 0)
    );
}

/// Without multipathd the map's key is unknown: the check says it failed,
/// and the command's answer is what it was.
#[test]
fn a_registration_count_that_cannot_be_taken_is_a_failed_check() {
    let mut sim = SimMap::new(2);
    Arc::get_mut(&mut sim).unwrap().multipathd_up = false;
    let mut m = multipath(&sim, Fixes::ALL);
    m.registration_checks = true;
    let r = out(&m, &sim, RELEASE, 5, K, 0);
    assert_eq!(r, ok());
    let maps = m.stats.maps();
    assert_eq!(maps.len(), 1);
    assert!(
        maps[0].outcome.as_ref().unwrap_err().contains("multipathd"),
        "{:?}",
        maps[0].outcome
    );
}

/// The map's devices, counting the commands reservd sends itself.
struct Counting {
    sim: Arc<SimMap>,
    runs: std::sync::atomic::AtomicUsize,
}

impl MapDevices for Counting {
    fn map_key(&self, minor: u32) -> Result<Option<u64>, String> {
        self.sim.map_key(minor)
    }
    fn active_paths(
        &self,
        map: std::os::fd::BorrowedFd<'_>,
    ) -> std::io::Result<Vec<std::path::PathBuf>> {
        self.sim.active_paths(map)
    }
    fn run(
        &self,
        via: reservd_daemon::backend::multipath::Via<'_>,
        cdb: &[u8; 10],
        params: &[u8],
    ) -> Answer {
        self.runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.sim.run(via, cdb, params)
    }
    fn suspend(&self, map: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
        self.sim.suspend(map)
    }
    fn resume(&self, map: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
        self.sim.resume(map)
    }
}

/// The registration count costs one command after a PR OUT (READ KEYS on
/// the map), and none at all after a PR IN.
#[test]
fn the_registration_count_adds_one_read_keys_to_pr_out_only() {
    use std::sync::atomic::Ordering::SeqCst;
    let sim = SimMap::new(2);
    let devices = Arc::new(Counting {
        sim: Arc::clone(&sim),
        runs: Default::default(),
    });
    let mut m = Multipath::new(
        Arc::clone(&sim) as Arc<dyn PersistLib>,
        Arc::clone(&devices) as Arc<dyn MapDevices>,
        Multipathd::from_env_value(Some("/nonexistent/reservd-test/multipathd.socket")),
        Diagnostics::default(),
        Fixes::ALL,
        1000,
    );
    assert_eq!(out(&m, &sim, REGISTER, 0, 0, K), ok());
    let sent = |f: &dyn Fn(&Multipath)| {
        let before = devices.runs.load(SeqCst);
        f(&m);
        devices.runs.load(SeqCst) - before
    };
    let reserve = |m: &Multipath| assert_eq!(out(m, &sim, RESERVE, 5, K, 0), ok());
    let release = |m: &Multipath| assert_eq!(out(m, &sim, RELEASE, 5, K, 0), ok());
    let read = |m: &Multipath| {
        for sa in [prin_sa::READ_KEYS, prin_sa::READ_RESERVATION] {
            assert_eq!(prin(m, &sim, sa).status, Status::GOOD);
        }
    };
    let off = (sent(&reserve), sent(&read), sent(&release));
    m.registration_checks = true;
    let sent = |f: &dyn Fn(&Multipath)| {
        let before = devices.runs.load(SeqCst);
        f(&m);
        devices.runs.load(SeqCst) - before
    };
    let on = (sent(&reserve), sent(&read), sent(&release));
    assert_eq!(on, (off.0 + 1, off.1, off.2 + 1), "off {off:?}, on {on:?}");
    assert_eq!(off.1, 2, "PR IN: one command down the map each");
}

#[test]
fn every_pr_in_goes_down_the_map_and_the_library_only_without_a_path() {
    let sim = SimMap::new(2);
    let m = multipath(&sim, Fixes::ALL);
    two_nodes(&m, &sim);
    // The simulated library cannot read the full status: the answer came
    // down the map, one registration for the map.
    let a = prin(&m, &sim, prin_sa::READ_FULL_STATUS);
    assert_eq!(a.status, Status::GOOD, "{a:?}");
    let descs = prin::parse_read_full_status(&a.data).unwrap().1;
    let keys: Vec<u64> = descs.iter().map(|d| d.key).collect();
    assert_eq!(keys, vec![OTHER, K]);
    assert!(descs[0].reservation_holder);
    let a = prin(&m, &sim, prin_sa::REPORT_CAPABILITIES);
    assert_eq!(a.status, Status::GOOD, "{a:?}");
    // With no active path the library is asked, and its failure is the
    // answer (the simulated one has no path either).
    sim.set_active(0, false);
    sim.set_active(1, false);
    let a = prin(&m, &sim, prin_sa::READ_KEYS);
    assert_ne!(a.status, Status::GOOD, "{a:?}");
    sim.set_active(0, true);
    let a = prin(&m, &sim, prin_sa::READ_RESERVATION);
    let r = prin::parse_read_reservation(&a.data).unwrap().1.unwrap();
    assert_eq!((r.key, r.pr_type), (OTHER, 5));
}

/// Two simulated maps behind one backend, the library's PR OUT on the
/// first held until the test lets it go.
struct TwoMaps {
    a: Arc<SimMap>,
    b: Arc<SimMap>,
    gate: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
    /// Library calls in flight and the most at once, per map.
    in_flight: std::sync::Mutex<[(usize, usize); 2]>,
    /// Library calls made, per map.
    calls: std::sync::Mutex<[usize; 2]>,
}

const MINOR_A: u32 = 7;
const MINOR_B: u32 = 8;

impl TwoMaps {
    fn new() -> Arc<TwoMaps> {
        let b = SimMap::new(2);
        for (i, p) in b.paths.lock().unwrap().iter_mut().enumerate() {
            p.node = format!("/dev/simb{}", i + 1).into();
        }
        Arc::new(TwoMaps {
            a: SimMap::new(2),
            b,
            gate: std::sync::Mutex::new(false),
            opened: std::sync::Condvar::new(),
            in_flight: std::sync::Mutex::new([(0, 0); 2]),
            calls: std::sync::Mutex::new([0; 2]),
        })
    }

    fn which(&self, fd: std::os::fd::BorrowedFd<'_>) -> usize {
        use std::os::unix::fs::MetadataExt;
        let ino = |f: std::os::fd::BorrowedFd<'_>| {
            std::fs::File::from(f.try_clone_to_owned().unwrap())
                .metadata()
                .unwrap()
                .ino()
        };
        if ino(fd) == ino(self.a.lu.as_fd()) {
            0
        } else {
            1
        }
    }

    fn sim(&self, i: usize) -> &SimMap {
        if i == 0 {
            &self.a
        } else {
            &self.b
        }
    }

    fn open_gate(&self) {
        *self.gate.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

impl PersistLib for TwoMaps {
    fn reserve_in(&self, fd: std::os::fd::BorrowedFd<'_>, sa: u8) -> (i32, Vec<u8>) {
        self.sim(self.which(fd)).reserve_in(fd, sa)
    }

    fn reserve_out(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        req: &reservd_proto::mpath_xlate::ProutRequest,
    ) -> i32 {
        let i = self.which(fd);
        self.calls.lock().unwrap()[i] += 1;
        {
            let mut f = self.in_flight.lock().unwrap();
            f[i].0 += 1;
            f[i].1 = f[i].1.max(f[i].0);
        }
        if i == 0 {
            let mut open = self.gate.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
        }
        let code = self.sim(i).reserve_out(fd, req);
        self.in_flight.lock().unwrap()[i].0 -= 1;
        code
    }
}

impl MapDevices for TwoMaps {
    fn map_key(&self, minor: u32) -> Result<Option<u64>, String> {
        self.sim(usize::from(minor == MINOR_B)).map_key(minor)
    }

    fn active_paths(
        &self,
        map: std::os::fd::BorrowedFd<'_>,
    ) -> std::io::Result<Vec<std::path::PathBuf>> {
        self.sim(self.which(map)).active_paths(map)
    }

    fn run(
        &self,
        via: reservd_daemon::backend::multipath::Via<'_>,
        cdb: &[u8; 10],
        params: &[u8],
    ) -> Answer {
        use reservd_daemon::backend::multipath::Via;
        let i = match via {
            Via::Map(fd) => self.which(fd),
            Via::Path(p) => usize::from(p.to_string_lossy().starts_with("/dev/simb")),
        };
        self.sim(i).run(via, cdb, params)
    }

    fn suspend(&self, map: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
        self.sim(self.which(map)).suspend(map)
    }

    fn resume(&self, map: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
        self.sim(self.which(map)).resume(map)
    }
}

/// A PR OUT through reservd on map `minor` of `two`.
fn out_on(m: &Multipath, two: &TwoMaps, minor: u32, sa: u8, key: u64, sa_key: u64) -> Answer {
    out_to(
        m,
        two.sim(usize::from(minor == MINOR_B)),
        minor,
        sa,
        0,
        key,
        sa_key,
    )
}

#[test]
fn a_map_whose_library_call_hangs_does_not_hold_up_another_map_and_its_own_commands_wait() {
    use std::sync::mpsc;
    use std::time::{Duration, Instant};
    let two = TwoMaps::new();
    let m = Arc::new(Multipath::new(
        Arc::clone(&two) as Arc<dyn PersistLib>,
        Arc::clone(&two) as Arc<dyn MapDevices>,
        Multipathd::from_env_value(Some("/nonexistent/reservd-test/multipathd.socket")),
        Diagnostics::default(),
        Fixes::ALL,
        1000,
    ));
    let run = |minor: u32, sa: u8, key: u64, sa_key: u64| {
        let (m, two) = (Arc::clone(&m), Arc::clone(&two));
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(out_on(&m, &two, minor, sa, key, sa_key));
        });
        rx
    };
    // Map A's registration hangs in the library.
    let first_a = run(MINOR_A, REGISTER, 0, 0xa1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while two.calls.lock().unwrap()[0] == 0 {
        assert!(
            Instant::now() < deadline,
            "map A's command never reached the library"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Map B's commands run meanwhile.
    let b = run(MINOR_B, REGISTER, 0, 0xb1);
    assert_eq!(b.recv_timeout(Duration::from_secs(10)), Ok(ok()));
    assert_eq!(two.b.keys(NODE2), vec![0xb1, 0xb1]);
    // A second command on map A waits for the first.
    let second_a = run(MINOR_A, REGISTER_AND_IGNORE, 0, 0xa2);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        two.calls.lock().unwrap()[0],
        1,
        "map A's commands overlapped"
    );
    assert!(first_a.try_recv().is_err() && second_a.try_recv().is_err());
    two.open_gate();
    assert_eq!(first_a.recv_timeout(Duration::from_secs(10)), Ok(ok()));
    assert_eq!(second_a.recv_timeout(Duration::from_secs(10)), Ok(ok()));
    assert_eq!(two.in_flight.lock().unwrap()[0].1, 1);
    assert_eq!(two.a.keys(NODE2), vec![0xa2, 0xa2]);
}
