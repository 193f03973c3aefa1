//! `reservdctl validate`'s checks ([`reservd_client::validate`]) on the
//! test kit's simulated map: two paths to the in-memory SPC-4 target, a
//! libmpathpersist that behaves as multipath-tools 0.9.4's, multipathd's
//! key, and reservd's multipath side running the PR OUT commands as it
//! runs a guest's. A second node has its own nexus to the LU.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use reservd_client::validate::{
    self, check_names, Look, Lu, Options, Outcome, PathState, PathView, Verdict,
};
use reservd_daemon::backend::multipath::library::PersistLib;
use reservd_daemon::backend::multipath::multipathd::Multipathd;
use reservd_daemon::backend::multipath::{prin_cdb, Diagnostics, MapDevices, Multipath};
use reservd_daemon::backend::{Command, Nexus};
use reservd_proto::cdb::{pad16, prin_sa, prout_sa, PrOutCdb};
use reservd_proto::onenexus::Fixes;
use reservd_proto::params::ProutParams;
use reservd_proto::prin;
use reservd_proto::sense::{Answer, Status};
use reservd_testkit::emulated::Emulated;
use reservd_testkit::sim::{SimMap, NODE2};

const KEY: u64 = validate::TEST_KEY_PREFIX | 0x00c0_ffee;
const OTHER: u64 = 0xbbbb;
/// The map's minor number.
const MINOR: u32 = 7;

/// The simulated map as validate drives it.
struct SimLu {
    sim: Arc<SimMap>,
    /// reservd's multipath side; `None`: a reservd without multipath
    /// support, whose commands reach one path (SG_IO on the map).
    reservd: Option<Multipath>,
    /// Make this PR OUT service action fail (RESERVATION CONFLICT).
    refuse: Option<u8>,
    /// The connection to reservd is lost at the n-th PR OUT (from 1) with
    /// this service action.
    lose_at: Option<(u8, usize)>,
    /// multipathd never fails a path set offline.
    stuck: bool,
    /// `interrupted()` says yes once the log has this line.
    stop_at: Option<&'static str>,
    /// What validate did, in order.
    log: Vec<String>,
}

impl SimLu {
    fn new(sim: &Arc<SimMap>) -> SimLu {
        let reservd = Multipath::new(
            Arc::clone(sim) as Arc<dyn PersistLib>,
            Arc::clone(sim) as Arc<dyn MapDevices>,
            Multipathd::from_env_value(Some("/nonexistent/reservd-test/multipathd.socket")),
            Diagnostics::default(),
            Fixes::ALL,
            1000,
        );
        SimLu {
            sim: Arc::clone(sim),
            reservd: Some(reservd),
            refuse: None,
            lose_at: None,
            stuck: false,
            stop_at: None,
            log: Vec::new(),
        }
    }

    fn index(&self, name: &str) -> usize {
        name.strip_prefix("sim")
            .and_then(|n| n.parse::<usize>().ok())
            .map(|n| n - 1)
            .unwrap_or_else(|| panic!("no path {name}"))
    }

    fn active(&self, i: usize) -> bool {
        self.sim.paths.lock().unwrap()[i].active
    }

    /// A PR IN from `nexus`, past unit attentions.
    fn prin(&self, nexus: Nexus, sa: u8) -> Result<Vec<u8>, String> {
        for _ in 0..4 {
            let a = self.sim.send(nexus, &prin_cdb(sa), &[]);
            if a.status == Status::GOOD {
                return Ok(a.data);
            }
            if a.sense_code().is_none_or(|c| c.key != 6) {
                return Err(format!("PR IN {sa}: {a:?}"));
            }
        }
        Err("unit attentions".into())
    }

    fn view(&self, i: usize) -> PathView {
        let nexus = (i + 1) as Nexus;
        let name = format!("sim{}", i + 1);
        if !self.active(i) {
            return PathView {
                name,
                usable: false,
                keys: Err("offline".into()),
                own_keys: Err("offline".into()),
                reservation: Err("offline".into()),
            };
        }
        let keys = self
            .prin(nexus, prin_sa::READ_KEYS)
            .map(|d| prin::parse_read_keys(&d).unwrap().1);
        let tid = Emulated::initiator_transport_id(nexus).encode();
        let own_keys = self.prin(nexus, prin_sa::READ_FULL_STATUS).map(|d| {
            prin::parse_read_full_status(&d)
                .unwrap()
                .1
                .iter()
                .filter(|r| r.transport_id == tid)
                .map(|r| r.key)
                .collect()
        });
        let reservation = self
            .prin(nexus, prin_sa::READ_RESERVATION)
            .map(|d| prin::parse_read_reservation(&d).unwrap().1);
        PathView {
            name,
            usable: true,
            keys,
            own_keys,
            reservation,
        }
    }
}

impl Lu for SimLu {
    fn prout(&mut self, sa: u8, t: u8, key: u64, sa_key: u64) -> Result<Answer, String> {
        let line = format!("prout {} type {t}", prout_sa::name(sa));
        self.log.push(line.clone());
        if let Some((lost, n)) = self.lose_at {
            if sa == lost && self.log.iter().filter(|l| **l == line).count() == n {
                return Err("reservd closed the connection".into());
            }
        }
        if self.refuse == Some(sa) {
            return Ok(Answer::status(Status::RESERVATION_CONFLICT));
        }
        let params = ProutParams {
            key,
            sa_key,
            ..Default::default()
        }
        .encode();
        let cdb = PrOutCdb {
            service_action: sa,
            scope: 0,
            pr_type: t,
            parameter_list_length: params.len() as u32,
        }
        .encode();
        match &self.reservd {
            Some(m) => m
                .execute(
                    &Command {
                        nexus: 1,
                        peer: None,
                        fd: self.sim.lu.as_fd(),
                        cdb: &pad16(&cdb),
                        params: &params,
                    },
                    MINOR,
                )
                .map_err(|e| e.to_string()),
            // Down the first active path.
            None => {
                let i = (0..2).find(|&i| self.active(i)).ok_or("no path")?;
                Ok(self.sim.send((i + 1) as Nexus, &cdb, &params))
            }
        }
    }

    fn look(&mut self) -> Result<Look, String> {
        let n = self.sim.paths.lock().unwrap().len();
        Ok(Look {
            paths: (0..n).map(|i| self.view(i)).collect(),
            map_key: self.sim.map_key(MINOR),
        })
    }

    fn path_state(&mut self, name: &str) -> Result<PathState, String> {
        let i = self.index(name);
        let running = self.active(i);
        let sysfs = self.log.iter().rev().find_map(|l| {
            l.strip_prefix(&format!("{name} ")).map(|s| {
                if s == "running" {
                    "running"
                } else {
                    "offline"
                }
            })
        });
        let sysfs = sysfs.unwrap_or("running").to_string();
        Ok(PathState {
            multipathd: Some(
                if running {
                    "active ready running"
                } else {
                    "failed faulty offline"
                }
                .into(),
            ),
            sysfs: Some(sysfs),
        })
    }

    fn set_running(&mut self, name: &str, running: bool) -> Result<(), String> {
        let i = self.index(name);
        self.log.push(format!(
            "{name} {}",
            if running { "running" } else { "offline" }
        ));
        if !self.stuck || running {
            self.sim.set_active(i, running);
        }
        Ok(())
    }

    fn unregister_on_path(&mut self, name: &str, key: u64) -> Result<(), String> {
        self.log.push(format!("unregister on {name}"));
        let nexus = (self.index(name) + 1) as Nexus;
        let a = self.sim.out(nexus, prout_sa::REGISTER, 0, key, 0);
        (a.status == Status::GOOD)
            .then_some(())
            .ok_or(format!("{a:?}"))
    }

    fn forget_map_key(&mut self) -> Result<(), String> {
        self.log.push("forget map key".into());
        *self.sim.prkey.lock().unwrap() = None;
        Ok(())
    }

    fn interrupted(&mut self) -> bool {
        self.stop_at
            .is_some_and(|at| self.log.iter().any(|l| l == at))
    }

    fn pause(&mut self, _d: Duration) {}
}

fn opts(with_failover: bool) -> Options {
    Options {
        key: KEY,
        expected: Vec::new(),
        force: false,
        with_failover,
        failover_path: None,
        path_timeout: Duration::from_millis(200),
    }
}

fn outcomes(r: &validate::Report) -> Vec<(&'static str, Outcome)> {
    r.checks.iter().map(|c| (c.name, c.outcome)).collect()
}

fn all(with_failover: bool, o: Outcome) -> Vec<(&'static str, Outcome)> {
    check_names(with_failover)
        .into_iter()
        .map(|n| (n, o))
        .collect()
}

/// Nothing of the test key is left: no path lists it, no reservation,
/// no key in multipathd, every path back.
fn assert_clean(sim: &SimMap) {
    for nexus in [1, 2, NODE2] {
        assert!(!sim.keys(nexus).contains(&KEY), "nexus {nexus}");
    }
    assert!(sim.reservation(NODE2).is_none_or(|r| r.key != KEY));
    assert_eq!(*sim.prkey.lock().unwrap(), None);
    assert!(sim.paths.lock().unwrap().iter().all(|p| p.active));
}

#[test]
fn a_clean_map_passes_every_check_and_is_left_clean() {
    for with_failover in [false, true] {
        let sim = SimMap::new(2);
        let mut lu = SimLu::new(&sim);
        let mut seen = Vec::new();
        let r = validate::run_with(&mut lu, &opts(with_failover), &mut |c| seen.push(c.name));
        assert_eq!(
            outcomes(&r),
            all(with_failover, Outcome::Pass),
            "{:#?}",
            r.checks
        );
        assert_eq!(
            seen,
            check_names(with_failover),
            "told of each check in order"
        );
        assert_eq!((r.verdict(), r.exit_code()), (Verdict::Passed, 0));
        assert_clean(&sim);
        let detail = |n| r.check(n).unwrap().detail.clone();
        assert_eq!(
            detail("key_on_every_path"),
            format!("0x{KEY:x} registered through sim1, sim2")
        );
        assert_eq!(
            detail("reservation_on_every_path"),
            format!("sim1, sim2: type 5 held with 0x{KEY:x}")
        );
        assert!(detail("cleanup").ends_with("unregistered through reservd; nothing left"));
        if with_failover {
            assert!(detail("failover_path_offline").starts_with("sim1 set offline"));
            assert_eq!(
                detail("failover_reservation_on_every_path"),
                format!("sim2: type 5 held with 0x{KEY:x} (not counted, not usable: sim1)")
            );
            assert!(detail("failover_path_back").starts_with("sim1 running"));
            // The reservation commands ran with sim1 offline.
            let i = lu.log.iter().position(|l| l == "sim1 offline").unwrap();
            let j = lu.log.iter().position(|l| l == "sim1 running").unwrap();
            assert_eq!(
                lu.log[i + 1..j],
                ["prout RESERVE type 5", "prout RELEASE type 5"]
            );
        }
    }
}

#[test]
fn a_map_another_node_holds_is_refused_and_left_alone() {
    let sim = SimMap::new(2);
    assert_eq!(
        sim.out(NODE2, prout_sa::REGISTER, 0, 0, OTHER).status,
        Status::GOOD
    );
    assert_eq!(
        sim.out(NODE2, prout_sa::RESERVE, 5, OTHER, 0).status,
        Status::GOOD
    );
    let mut lu = SimLu::new(&sim);
    let r = validate::run(&mut lu, &opts(true));
    assert_eq!((r.verdict(), r.exit_code()), (Verdict::Refused, 6));
    assert_eq!(r.checks[0].outcome, Outcome::Refused);
    assert!(
        r.checks[0].detail.contains("nobody said to expect: 0xbbbb"),
        "{}",
        r.checks[0].detail
    );
    assert!(r.checks[1..].iter().all(|c| c.outcome == Outcome::Skip));
    assert!(lu.log.is_empty(), "nothing sent: {:?}", lu.log);
    assert_eq!(sim.keys(NODE2), vec![OTHER]);
    assert_eq!(sim.reservation(NODE2).map(|r| r.key), Some(OTHER));
    // Expecting its key is not enough while it holds a reservation.
    let r = validate::run(
        &mut lu,
        &Options {
            expected: vec![OTHER],
            ..opts(false)
        },
    );
    assert_eq!(r.verdict(), Verdict::Refused);
    assert!(r.checks[0]
        .detail
        .contains("holds a reservation (type 5, key 0xbbbb)"));
    // --force: the registration checks run, the reservation is left alone.
    let r = validate::run(
        &mut lu,
        &Options {
            expected: vec![OTHER],
            force: true,
            ..opts(false)
        },
    );
    let want: Vec<(&str, Outcome)> = check_names(false)
        .into_iter()
        .map(|n| {
            let skipped = n.contains("reserv") || n.contains("release");
            (
                n,
                if skipped {
                    Outcome::Skip
                } else {
                    Outcome::Pass
                },
            )
        })
        .collect();
    assert_eq!(outcomes(&r), want, "{:#?}", r.checks);
    assert_eq!(r.verdict(), Verdict::Passed);
    assert!(!lu
        .log
        .iter()
        .any(|l| l.contains("RESERVE") || l.contains("RELEASE")));
    assert_eq!(sim.keys(NODE2), vec![OTHER]);
    assert_eq!(sim.reservation(NODE2).map(|r| r.key), Some(OTHER));
    assert_eq!(*sim.prkey.lock().unwrap(), None);
}

#[test]
fn expected_registrations_of_other_nodes_are_kept() {
    let sim = SimMap::new(2);
    assert_eq!(
        sim.out(NODE2, prout_sa::REGISTER, 0, 0, OTHER).status,
        Status::GOOD
    );
    let mut lu = SimLu::new(&sim);
    let r = validate::run(
        &mut lu,
        &Options {
            expected: vec![OTHER],
            ..opts(true)
        },
    );
    assert_eq!(outcomes(&r), all(true, Outcome::Pass), "{:#?}", r.checks);
    assert!(r.checks[0].detail.contains("expected registrations 0xbbbb"));
    assert_eq!(sim.keys(NODE2), vec![OTHER]);
    assert_clean(&sim);
}

#[test]
fn a_map_this_host_uses_is_refused() {
    let sim = SimMap::new(2);
    let mut lu = SimLu::new(&sim);
    // The map's guest registered through reservd: multipathd has its key.
    lu.prout(prout_sa::REGISTER, 0, 0, 0x6e57).unwrap();
    lu.log.clear();
    let r = validate::run(
        &mut lu,
        &Options {
            force: true,
            expected: vec![0x6e57],
            ..opts(false)
        },
    );
    assert_eq!(r.verdict(), Verdict::Refused);
    assert!(
        r.checks[0]
            .detail
            .contains("multipathd holds key 0x6e57 for the map"),
        "{}",
        r.checks[0].detail
    );
    assert!(lu.log.is_empty());
    // Its paths registered, multipathd without the key: refused too.
    *sim.prkey.lock().unwrap() = None;
    let r = validate::run(&mut lu, &opts(false));
    assert_eq!(r.verdict(), Verdict::Refused);
    assert!(
        r.checks[0]
            .detail
            .contains("this host's paths are registered: sim1 (0x6e57), sim2 (0x6e57)"),
        "{}",
        r.checks[0].detail
    );
    assert_eq!(sim.keys(NODE2), vec![0x6e57, 0x6e57]);
}

#[test]
fn a_failed_command_skips_the_rest_and_still_cleans_up() {
    let sim = SimMap::new(2);
    let mut lu = SimLu::new(&sim);
    lu.refuse = Some(prout_sa::RESERVE);
    let r = validate::run(&mut lu, &opts(true));
    assert_eq!((r.verdict(), r.exit_code()), (Verdict::Failed, 5));
    let o = outcomes(&r);
    assert_eq!(o[4], ("reserve", Outcome::Fail));
    assert!(r.checks[4].detail.ends_with("RESERVATION CONFLICT"));
    assert!(
        o[5..o.len() - 1].iter().all(|c| c.1 == Outcome::Skip),
        "{o:?}"
    );
    assert_eq!(r.checks[5].detail, "not run: reserve failed");
    assert_eq!(o.last(), Some(&("cleanup", Outcome::Pass)));
    assert_clean(&sim);
    let text = validate::text("h", &r);
    assert!(
        text.ends_with("Verdict: FAILED (1 of 15 checks failed: reserve)\n"),
        "{text}"
    );
}

#[test]
fn a_stop_runs_the_cleanup_and_brings_the_path_back() {
    // Stopped right after the registration.
    let sim = SimMap::new(2);
    let mut lu = SimLu::new(&sim);
    lu.stop_at = Some("prout REGISTER type 0");
    let r = validate::run(&mut lu, &opts(false));
    assert_eq!((r.verdict(), r.exit_code()), (Verdict::Interrupted, 130));
    assert_eq!(r.check("register").unwrap().outcome, Outcome::Pass);
    assert_eq!(
        r.check("key_on_every_path").unwrap().detail,
        "not run: interrupted"
    );
    assert_eq!(r.check("cleanup").unwrap().outcome, Outcome::Pass);
    assert_clean(&sim);
    // Stopped once a path is offline.
    let sim = SimMap::new(2);
    let mut lu = SimLu::new(&sim);
    lu.stop_at = Some("sim1 offline");
    let r = validate::run(&mut lu, &opts(true));
    assert_eq!(r.verdict(), Verdict::Interrupted, "{:#?}", r.checks);
    assert_eq!(
        r.check("failover_path_offline").unwrap().detail,
        "sim1 set offline, multipathd did not fail it: interrupted"
    );
    let cleanup = r.check("cleanup").unwrap();
    assert_eq!(cleanup.outcome, Outcome::Pass, "{}", cleanup.detail);
    assert!(
        cleanup.detail.starts_with("sim1 running again"),
        "{}",
        cleanup.detail
    );
    assert_clean(&sim);
    let text = validate::text("h", &r);
    assert!(
        text.ends_with("Verdict: INTERRUPTED (cleanup: PASS)\n"),
        "{text}"
    );
}

#[test]
fn what_reservd_leaves_is_removed_directly() {
    let sim = SimMap::new(2);
    let mut lu = SimLu::new(&sim);
    // reservd goes away before the unregistration (the second REGISTER).
    lu.lose_at = Some((prout_sa::REGISTER, 2));
    let r = validate::run(&mut lu, &opts(false));
    let cleanup = r.check("cleanup").unwrap();
    assert_eq!(cleanup.outcome, Outcome::Pass, "{}", cleanup.detail);
    assert!(
        cleanup
            .detail
            .contains("unregistering through reservd: reservd closed the connection")
            && cleanup.detail.contains("unregistered on sim1 directly")
            && cleanup.detail.contains("unregistered on sim2 directly")
            && cleanup.detail.contains("multipathd told to forget the key"),
        "{}",
        cleanup.detail
    );
    assert_eq!(r.verdict(), Verdict::Passed);
    assert_clean(&sim);
}

#[test]
fn a_reservd_without_multipath_fails_the_path_checks() {
    // Its REGISTER reaches one path, and multipathd never hears of it.
    let sim = SimMap::new(2);
    let mut lu = SimLu::new(&sim);
    lu.reservd = None;
    let r = validate::run(&mut lu, &opts(false));
    assert_eq!(r.verdict(), Verdict::Failed);
    let c = r.check("key_on_every_path").unwrap();
    assert_eq!(c.outcome, Outcome::Fail);
    assert_eq!(c.detail, format!("0x{KEY:x}: sim2 lacks it"));
    assert_eq!(r.check("multipathd_key").unwrap().outcome, Outcome::Fail);
    // Observations: the reservation checks still ran.
    assert_eq!(r.check("reserve").unwrap().outcome, Outcome::Pass);
    assert_eq!(r.check("cleanup").unwrap().outcome, Outcome::Pass);
    assert_clean(&sim);
}

#[test]
fn a_path_multipathd_does_not_fail_is_a_failed_failover() {
    let sim = SimMap::new(2);
    let mut lu = SimLu::new(&sim);
    lu.stuck = true;
    let r = validate::run(&mut lu, &opts(true));
    let c = r.check("failover_path_offline").unwrap();
    assert_eq!(c.outcome, Outcome::Fail);
    assert!(
        c.detail
            .starts_with("sim1 set offline, multipathd did not fail it: after 0 s"),
        "{}",
        c.detail
    );
    assert_eq!(r.check("failover_reserve").unwrap().outcome, Outcome::Skip);
    // The cleanup set it running again.
    assert!(lu.log.contains(&"sim1 running".to_string()));
    assert_eq!(r.check("cleanup").unwrap().outcome, Outcome::Pass);
    assert_clean(&sim);
    // A single path: nothing to fail over to.
    let sim = SimMap::new(1);
    let mut lu = SimLu::new(&sim);
    let r = validate::run(&mut lu, &opts(true));
    assert_eq!(
        r.check("failover_path_offline").unwrap().detail,
        "1 usable path(s): none to fail over to"
    );
    assert_clean(&sim);
}
