//! `reservdctl validate`: before a map goes live, the storage checks a
//! cluster's validation runs (Windows failover clustering's "Validate SCSI-3
//! Persistent Reservation", Pacemaker's fence_scsi), run non-destructively
//! through reservd, the way a guest's commands go, with a test key that is
//! removed afterwards.
//!
//! The checks, in order (each one a verdict: pass, fail, skip or refused):
//!
//! 1. `preflight`: the map is unused. multipathd holds no key for it, none
//!    of its paths is registered, the LU has no registration but those the
//!    operator expects (`--expect-key`) and no reservation; otherwise the
//!    run is *refused* and nothing is sent (`--force` runs anyway, and then
//!    leaves another node's reservation alone: the reservation checks are
//!    skipped). At least one usable path, every usable path readable.
//! 2. `register`: REGISTER of the test key through reservd on the map.
//! 3. `key_on_every_path`: every usable path holds the test key (a
//!    registration through its own I_T nexus, READ FULL STATUS).
//! 4. `multipathd_key`: multipathd holds the test key for the map, so that
//!    it registers it on paths that come back.
//! 5. `reserve`: RESERVE, type 5 (Write Exclusive, registrants only).
//! 6. `reservation_on_every_path`: every usable path reads that
//!    reservation with the test key.
//! 7. `release`, then 8. `released_on_every_path`.
//!
//! With `--with-failover`, then: 9. `failover_path_offline` (one path set
//! offline in sysfs, until multipathd has failed it), 10. to 13. the same
//! RESERVE, read-back, RELEASE and read-back on the remaining paths, and 14.
//! `failover_path_back` (the path running again, multipathd using it, and
//! holding the test key).
//!
//! Last, always, 15. `cleanup`: the path brought back if it is still
//! offline, a reservation with the test key released, the test key
//! unregistered through reservd; what is left is removed directly (the
//! registration on a path by SG_IO, the key in multipathd), and the check
//! passes when no path lists the test key, no reservation carries it and
//! multipathd holds no key for the map.
//!
//! A failed command (register, reserve, release, taking the path offline or
//! back) ends the run: the later checks are skipped and the cleanup runs.
//! A failed observation does not. A stop the operator asks for (SIGINT,
//! SIGTERM) is checked before each step and while waiting for a path, and
//! leads to the cleanup too.
//!
//! The device side is a [`Lu`]: the host's in reservdctl, a simulated map
//! in the tests.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::report::Key;
use reservd_proto::cdb::{pr_type, prout_sa};
use reservd_proto::prin::Reservation;
use reservd_proto::sense::{Answer, Status};

/// Test keys are this prefix ("rsvd") and 32 random bits: recognisable
/// when one is ever left behind.
pub const TEST_KEY_PREFIX: u64 = 0x7273_7664_0000_0000;

/// The reservation type the checks use: Write Exclusive, registrants only,
/// every registered path of a map holds it.
pub const TEST_TYPE: u8 = pr_type::WRITE_EXCLUSIVE_REGISTRANTS_ONLY;

/// How often a path's state is read while waiting for it.
const POLL: Duration = Duration::from_millis(250);

/// What one path of the map reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathView {
    /// Kernel name, e.g. `sda`.
    pub name: String,
    /// Whether it carries I/O (sysfs `running`, multipathd not failed).
    pub usable: bool,
    /// READ KEYS through it: the LU's registrations.
    pub keys: Result<Vec<u64>, String>,
    /// The registrations made through its own I_T nexus.
    pub own_keys: Result<Vec<u64>, String>,
    /// READ RESERVATION through it.
    pub reservation: Result<Option<Reservation>, String>,
}

/// Everything about the map at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Look {
    pub paths: Vec<PathView>,
    /// The key multipathd holds for the map.
    pub map_key: Result<Option<u64>, String>,
}

/// A path's state, as sysfs and multipathd tell it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PathState {
    /// sysfs `device/state`.
    pub sysfs: Option<String>,
    /// multipathd's dm state, checker state and device state.
    pub multipathd: Option<String>,
}

impl PathState {
    fn words(&self) -> Vec<&str> {
        self.multipathd
            .as_deref()
            .map(|m| m.split_whitespace().collect())
            .unwrap_or_default()
    }

    /// Device-mapper no longer uses it: multipathd failed it.
    pub fn failed(&self) -> bool {
        self.words()
            .iter()
            .any(|w| matches!(*w, "failed" | "faulty"))
    }

    /// Running again, and multipathd uses it.
    pub fn in_use(&self) -> bool {
        let w = self.words();
        self.sysfs.as_deref() == Some("running")
            && w.contains(&"active")
            && w.contains(&"ready")
            && !self.failed()
    }
}

/// The map, as validate drives it.
pub trait Lu {
    /// A PR OUT through reservd on the map (a basic parameter list).
    fn prout(&mut self, sa: u8, pr_type: u8, key: u64, sa_key: u64) -> Result<Answer, String>;
    /// Read every path of the map, and multipathd's key for it.
    fn look(&mut self) -> Result<Look, String>;
    /// The state of path `name`.
    fn path_state(&mut self, name: &str) -> Result<PathState, String>;
    /// Set path `name` offline (`false`) or running (`true`).
    fn set_running(&mut self, name: &str, running: bool) -> Result<(), String>;
    /// Remove the registration of `key` made through path `name`, on that
    /// path directly (the cleanup's last resort).
    fn unregister_on_path(&mut self, name: &str, key: u64) -> Result<(), String>;
    /// Make multipathd forget the map's key (the cleanup's last resort).
    fn forget_map_key(&mut self) -> Result<(), String>;
    /// Whether the operator asked to stop.
    fn interrupted(&mut self) -> bool;
    /// Wait a little before reading a path's state again.
    fn pause(&mut self, d: Duration);
}

/// What the operator asked for.
#[derive(Clone, Debug)]
pub struct Options {
    /// The test key.
    pub key: u64,
    /// Registrations that may be on the LU already (other nodes').
    pub expected: Vec<u64>,
    /// Run even though the LU has registrations or a reservation.
    pub force: bool,
    /// Take a path offline and run the reservation checks again.
    pub with_failover: bool,
    /// The path to take offline (default: the first usable one).
    pub failover_path: Option<String>,
    /// How long a path may take to be failed or used again by multipathd.
    pub path_timeout: Duration,
}

/// A check's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Fail,
    /// Not run: an earlier command failed, the run was interrupted, or
    /// `--force` left another node's reservation alone.
    Skip,
    /// The LU is in use: nothing was sent.
    Refused,
}

impl Outcome {
    fn word(self) -> &'static str {
        match self {
            Outcome::Pass => "PASS",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "SKIP",
            Outcome::Refused => "REFUSED",
        }
    }
}

/// One check and its verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    #[serde(rename = "result")]
    pub outcome: Outcome,
    pub detail: String,
}

/// The run: every check, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub key: u64,
    pub checks: Vec<Check>,
    pub interrupted: bool,
}

/// How a run ended, for the exit status and the last line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Passed,
    Failed,
    Refused,
    Interrupted,
}

impl Report {
    pub fn verdict(&self) -> Verdict {
        if self.interrupted {
            Verdict::Interrupted
        } else if self.checks.iter().any(|c| c.outcome == Outcome::Refused) {
            Verdict::Refused
        } else if self.checks.iter().any(|c| c.outcome == Outcome::Fail) {
            Verdict::Failed
        } else {
            Verdict::Passed
        }
    }

    /// `reservdctl validate`'s exit status: 0 passed, 5 a check failed,
    /// 6 refused, 130 interrupted.
    pub fn exit_code(&self) -> u8 {
        match self.verdict() {
            Verdict::Passed => 0,
            Verdict::Failed => 5,
            Verdict::Refused => 6,
            Verdict::Interrupted => 130,
        }
    }

    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }
}

/// The names of the checks a run makes, in order.
pub fn check_names(with_failover: bool) -> Vec<&'static str> {
    let mut v = vec![
        "preflight",
        "register",
        "key_on_every_path",
        "multipathd_key",
        "reserve",
        "reservation_on_every_path",
        "release",
        "released_on_every_path",
    ];
    if with_failover {
        v.extend([
            "failover_path_offline",
            "failover_reserve",
            "failover_reservation_on_every_path",
            "failover_release",
            "failover_released_on_every_path",
            "failover_path_back",
        ]);
    }
    v.push("cleanup");
    v
}

fn hex(k: u64) -> String {
    format!("0x{k:x}")
}

fn keys_text(ks: &[u64]) -> String {
    ks.iter().map(|k| hex(*k)).collect::<Vec<_>>().join(", ")
}

fn answer_text(a: &Answer) -> String {
    let name = a.status.name();
    match a.sense_code() {
        Some(c) if a.status == Status::CHECK_CONDITION => {
            format!("{name}, sense {:02x}/{:02x}/{:02x}", c.key, c.asc, c.ascq)
        }
        _ => name.to_string(),
    }
}

/// A PR OUT repeated past unit attentions (a path that came back reports
/// one), as an initiator does.
fn prout(lu: &mut dyn Lu, sa: u8, t: u8, key: u64, sa_key: u64) -> Result<Answer, String> {
    let mut a = lu.prout(sa, t, key, sa_key)?;
    for _ in 0..3 {
        let ua = a.status == Status::CHECK_CONDITION && a.sense_code().is_some_and(|c| c.key == 6);
        if !ua {
            break;
        }
        a = lu.prout(sa, t, key, sa_key)?;
    }
    Ok(a)
}

/// The paths `look` counts: usable ones (and the names of the others).
fn usable(look: &Look) -> (Vec<&PathView>, Vec<&str>) {
    let (u, n): (Vec<&PathView>, Vec<&PathView>) = look.paths.iter().partition(|p| p.usable);
    (u, n.iter().map(|p| p.name.as_str()).collect())
}

fn not_counted(others: &[&str]) -> String {
    if others.is_empty() {
        String::new()
    } else {
        format!(" (not counted, not usable: {})", others.join(", "))
    }
}

/// The LU's registrations, as the usable paths read them.
fn lu_keys(look: &Look) -> Result<Vec<u64>, String> {
    let mut all = Vec::new();
    for p in usable(look).0 {
        let ks = p.keys.as_ref().map_err(|e| format!("{}: {e}", p.name))?;
        all.extend(ks);
    }
    all.sort_unstable();
    all.dedup();
    Ok(all)
}

/// The reservation, as the first usable path that can tell reads it.
fn lu_reservation(look: &Look) -> Option<Reservation> {
    usable(look)
        .0
        .iter()
        .find_map(|p| p.reservation.as_ref().ok())
        .copied()
        .flatten()
}

struct Run<'a> {
    lu: &'a mut dyn Lu,
    opts: &'a Options,
    /// Told of each check as it ends.
    progress: &'a mut dyn FnMut(&Check),
    report: Report,
    /// Why the rest is not run, once something failed or a stop came.
    stopped: Option<String>,
    /// A REGISTER of the test key was sent.
    registered: bool,
    /// The path set offline, until it is back.
    offline: Option<String>,
    /// Another node's reservation is on the LU (`--force`).
    foreign_reservation: Option<Reservation>,
    /// The last read of the map.
    last: Option<Look>,
}

impl Run<'_> {
    fn push(&mut self, name: &'static str, outcome: Outcome, detail: String) {
        let c = Check {
            name,
            outcome,
            detail,
        };
        (self.progress)(&c);
        self.report.checks.push(c);
    }

    /// Run step `name` unless the run has stopped; a failed `gate` stops
    /// it.
    fn step(
        &mut self,
        name: &'static str,
        gate: bool,
        f: impl FnOnce(&mut Self) -> (Outcome, String),
    ) {
        if self.stopped.is_none() && self.lu.interrupted() {
            self.report.interrupted = true;
            self.stopped = Some("interrupted".into());
        }
        if let Some(why) = &self.stopped {
            let detail = format!("not run: {why}");
            self.push(name, Outcome::Skip, detail);
            return;
        }
        let (outcome, detail) = f(self);
        if gate && outcome == Outcome::Fail {
            self.stopped = Some(format!("{name} failed"));
        }
        self.push(name, outcome, detail);
    }

    fn look(&mut self) -> Result<Look, String> {
        let l = self.lu.look();
        self.last = l.as_ref().ok().cloned();
        l
    }

    /// A PR OUT that must be GOOD.
    fn command(&mut self, what: &str, sa: u8, t: u8, key: u64, sa_key: u64) -> (Outcome, String) {
        match prout(self.lu, sa, t, key, sa_key) {
            Ok(a) if a.status == Status::GOOD => (
                Outcome::Pass,
                format!("{what} through reservd on the map: GOOD"),
            ),
            Ok(a) => (
                Outcome::Fail,
                format!("{what} through reservd on the map: {}", answer_text(&a)),
            ),
            Err(e) => (
                Outcome::Fail,
                format!("{what} through reservd on the map: {e}"),
            ),
        }
    }

    /// Every usable path holds the test key through its own nexus.
    fn key_on_every_path(&mut self) -> (Outcome, String) {
        let look = match self.look() {
            Ok(l) => l,
            Err(e) => return (Outcome::Fail, format!("cannot read the paths: {e}")),
        };
        let key = self.opts.key;
        let (paths, others) = usable(&look);
        let mut lacking = Vec::new();
        for p in &paths {
            match &p.own_keys {
                Ok(k) if k.contains(&key) => {}
                Ok(_) => lacking.push(format!("{} lacks it", p.name)),
                Err(e) => lacking.push(format!("{}: {e}", p.name)),
            }
        }
        if paths.is_empty() {
            return (Outcome::Fail, "no usable path".into());
        }
        let names: Vec<&str> = paths.iter().map(|p| p.name.as_str()).collect();
        if lacking.is_empty() {
            (
                Outcome::Pass,
                format!(
                    "{} registered through {}{}",
                    hex(key),
                    names.join(", "),
                    not_counted(&others)
                ),
            )
        } else {
            (
                Outcome::Fail,
                format!(
                    "{}: {}{}",
                    hex(key),
                    lacking.join("; "),
                    not_counted(&others)
                ),
            )
        }
    }

    /// multipathd holds `want` for the map (from the last read).
    fn multipathd_key(&mut self, want: Option<u64>) -> (Outcome, String) {
        let Some(look) = &self.last else {
            return (Outcome::Fail, "the paths could not be read".into());
        };
        match &look.map_key {
            Ok(k) if *k == want => (
                Outcome::Pass,
                match want {
                    Some(k) => format!("multipathd holds {} for the map", hex(k)),
                    None => "multipathd holds no key for the map".into(),
                },
            ),
            Ok(Some(k)) => (
                Outcome::Fail,
                format!("multipathd holds {} for the map", hex(*k)),
            ),
            Ok(None) => (
                Outcome::Fail,
                "multipathd holds no key for the map: it cannot register it on paths that \
                 come back"
                    .into(),
            ),
            Err(e) => (Outcome::Fail, format!("multipathd: {e}")),
        }
    }

    /// Every usable path reads `want` as the reservation.
    fn reservation_everywhere(&mut self, want: Option<Reservation>) -> (Outcome, String) {
        let look = match self.look() {
            Ok(l) => l,
            Err(e) => return (Outcome::Fail, format!("cannot read the paths: {e}")),
        };
        let (paths, others) = usable(&look);
        if paths.is_empty() {
            return (Outcome::Fail, "no usable path".into());
        }
        let describe = |r: &Option<Reservation>| match r {
            None => "no reservation".to_string(),
            Some(r) => format!("type {} held with {}", r.pr_type, hex(r.key)),
        };
        let mut wrong = Vec::new();
        for p in &paths {
            match &p.reservation {
                Ok(r) if *r == want => {}
                Ok(r) => wrong.push(format!("{} reads {}", p.name, describe(r))),
                Err(e) => wrong.push(format!("{}: {e}", p.name)),
            }
        }
        let names: Vec<&str> = paths.iter().map(|p| p.name.as_str()).collect();
        if wrong.is_empty() {
            (
                Outcome::Pass,
                format!(
                    "{}: {}{}",
                    names.join(", "),
                    describe(&want),
                    not_counted(&others)
                ),
            )
        } else {
            (
                Outcome::Fail,
                format!(
                    "want {}: {}{}",
                    describe(&want),
                    wrong.join("; "),
                    not_counted(&others)
                ),
            )
        }
    }

    /// Wait until path `name` is failed (`back` false) or in use again.
    fn wait_path(&mut self, name: &str, back: bool) -> Result<Duration, String> {
        let start = Instant::now();
        let mut last = PathState::default();
        loop {
            if self.lu.interrupted() {
                self.report.interrupted = true;
                return Err("interrupted".into());
            }
            last = self.lu.path_state(name).unwrap_or(last);
            let done = if back { last.in_use() } else { last.failed() };
            if done {
                return Ok(start.elapsed());
            }
            if start.elapsed() >= self.opts.path_timeout {
                return Err(format!(
                    "after {:.0} s: sysfs {}, multipathd {}",
                    self.opts.path_timeout.as_secs_f64(),
                    last.sysfs.as_deref().unwrap_or("unknown"),
                    last.multipathd.as_deref().unwrap_or("unknown")
                ));
            }
            self.lu.pause(POLL);
        }
    }

    fn preflight(&mut self) -> (Outcome, String) {
        let look = match self.look() {
            Ok(l) => l,
            Err(e) => return (Outcome::Fail, format!("cannot read the map: {e}")),
        };
        let (paths, others) = usable(&look);
        if paths.is_empty() {
            return (Outcome::Fail, "no usable path".into());
        }
        let mine: Vec<String> = paths
            .iter()
            .filter_map(|p| match &p.own_keys {
                Ok(k) if !k.is_empty() => Some(format!("{} ({})", p.name, keys_text(k))),
                _ => None,
            })
            .collect();
        match &look.map_key {
            Ok(Some(k)) => {
                return (
                    Outcome::Refused,
                    format!(
                        "multipathd holds key {} for the map: this host uses it (its \
                         registration would be replaced); validate a map before it goes live",
                        hex(*k)
                    ),
                )
            }
            Ok(None) => {}
            Err(e) => return (Outcome::Fail, format!("multipathd cannot be asked: {e}")),
        }
        if !mine.is_empty() {
            return (
                Outcome::Refused,
                format!(
                    "this host's paths are registered: {}; validate a map before it goes live",
                    mine.join(", ")
                ),
            );
        }
        let keys = match lu_keys(&look) {
            Ok(k) => k,
            Err(e) => return (Outcome::Fail, format!("cannot read the LU's keys: {e}")),
        };
        if keys.contains(&self.opts.key) {
            return (
                Outcome::Refused,
                format!("the test key {} is registered already", hex(self.opts.key)),
            );
        }
        let unexpected: Vec<u64> = keys
            .iter()
            .copied()
            .filter(|k| !self.opts.expected.contains(k))
            .collect();
        let reservation = lu_reservation(&look);
        let mut notes = Vec::new();
        if !unexpected.is_empty() {
            if !self.opts.force {
                return (
                    Outcome::Refused,
                    format!(
                        "the LU has registrations nobody said to expect: {} (another node \
                         uses it?); name them with --expect-key, or run with --force",
                        keys_text(&unexpected)
                    ),
                );
            }
            notes.push(format!("--force: registrations {}", keys_text(&unexpected)));
        }
        if let Some(r) = reservation {
            if !self.opts.force {
                return (
                    Outcome::Refused,
                    format!(
                        "the LU holds a reservation (type {}, key {}): another node uses it; \
                         --force runs the other checks and leaves it alone",
                        r.pr_type,
                        hex(r.key)
                    ),
                );
            }
            notes.push(format!(
                "--force: the reservation (type {}, key {}) is left alone, the reservation \
                 checks are skipped",
                r.pr_type,
                hex(r.key)
            ));
            self.foreign_reservation = Some(r);
        }
        let expected: Vec<u64> = keys
            .iter()
            .copied()
            .filter(|k| self.opts.expected.contains(k))
            .collect();
        let mut detail = format!(
            "{} usable path(s){}; multipathd holds no key for the map; ",
            paths.len(),
            not_counted(&others)
        );
        if keys.is_empty() {
            detail.push_str("the LU has no registration");
        } else if !expected.is_empty() {
            let _ = write!(detail, "expected registrations {}", keys_text(&expected));
        }
        if reservation.is_none() {
            detail.push_str(", no reservation");
        }
        for n in notes {
            let _ = write!(detail, "; {n}");
        }
        (Outcome::Pass, detail)
    }

    /// The reservation checks, `prefix` naming them.
    fn reservation_checks(&mut self, names: [&'static str; 4]) {
        let key = self.opts.key;
        let held = Some(Reservation {
            key,
            scope: 0,
            pr_type: TEST_TYPE,
        });
        if let Some(r) = self.foreign_reservation {
            for name in names {
                self.step(name, false, |_| {
                    (
                        Outcome::Skip,
                        format!(
                            "the LU holds another node's reservation (type {}, key {}): left \
                             alone (--force)",
                            r.pr_type,
                            hex(r.key)
                        ),
                    )
                });
            }
            return;
        }
        self.step(names[0], true, |r| {
            r.command("RESERVE type 5", prout_sa::RESERVE, TEST_TYPE, key, 0)
        });
        self.step(names[1], false, |r| r.reservation_everywhere(held));
        self.step(names[2], true, |r| {
            r.command("RELEASE type 5", prout_sa::RELEASE, TEST_TYPE, key, 0)
        });
        self.step(names[3], false, |r| r.reservation_everywhere(None));
    }

    fn failover_offline(&mut self) -> (Outcome, String) {
        let look = match self.last.clone().map(Ok).unwrap_or_else(|| self.look()) {
            Ok(l) => l,
            Err(e) => return (Outcome::Fail, format!("cannot read the paths: {e}")),
        };
        let (paths, _) = usable(&look);
        if paths.len() < 2 {
            return (
                Outcome::Fail,
                format!("{} usable path(s): none to fail over to", paths.len()),
            );
        }
        let name = match &self.opts.failover_path {
            Some(n) if paths.iter().any(|p| &p.name == n) => n.clone(),
            Some(n) => {
                return (
                    Outcome::Fail,
                    format!("{n} is not a usable path of the map"),
                )
            }
            None => paths[0].name.clone(),
        };
        if let Err(e) = self.lu.set_running(&name, false) {
            return (Outcome::Fail, format!("cannot set {name} offline: {e}"));
        }
        self.offline = Some(name.clone());
        match self.wait_path(&name, false) {
            Ok(t) => (
                Outcome::Pass,
                format!(
                    "{name} set offline; multipathd failed it after {:.1} s",
                    t.as_secs_f64()
                ),
            ),
            Err(e) => (
                Outcome::Fail,
                format!("{name} set offline, multipathd did not fail it: {e}"),
            ),
        }
    }

    fn failover_back(&mut self) -> (Outcome, String) {
        let Some(name) = self.offline.clone() else {
            return (Outcome::Fail, "no path was set offline".into());
        };
        if let Err(e) = self.lu.set_running(&name, true) {
            return (Outcome::Fail, format!("cannot set {name} running: {e}"));
        }
        let took = match self.wait_path(&name, true) {
            Ok(t) => t,
            Err(e) => {
                return (
                    Outcome::Fail,
                    format!("{name} set running, multipathd does not use it: {e}"),
                )
            }
        };
        self.offline = None;
        // Its registration stayed on the LU, or multipathd registers the
        // map's key on it when it checks it: wait for either.
        let key = self.opts.key;
        let start = Instant::now();
        loop {
            let look = match self.look() {
                Ok(l) => l,
                Err(e) => return (Outcome::Fail, format!("cannot read the paths: {e}")),
            };
            let own = look
                .paths
                .iter()
                .find(|p| p.name == name)
                .map(|p| p.own_keys.clone());
            match own {
                Some(Ok(k)) if k.contains(&key) => {
                    return (
                        Outcome::Pass,
                        format!(
                            "{name} running; multipathd used it again after {:.1} s; it holds {}",
                            took.as_secs_f64(),
                            hex(key)
                        ),
                    )
                }
                _ if self.lu.interrupted() => {
                    self.report.interrupted = true;
                    return (
                        Outcome::Fail,
                        format!(
                            "{name} is used again; interrupted before it held {}",
                            hex(key)
                        ),
                    );
                }
                _ if start.elapsed() >= self.opts.path_timeout => {
                    return (
                        Outcome::Fail,
                        format!(
                            "{name} is used again but does not hold {}: {}",
                            hex(key),
                            match own {
                                Some(Ok(k)) if k.is_empty() => "no registration".to_string(),
                                Some(Ok(k)) => format!("it holds {}", keys_text(&k)),
                                Some(Err(e)) => e,
                                None => "the path is gone".into(),
                            }
                        ),
                    )
                }
                _ => self.lu.pause(POLL),
            }
        }
    }

    /// Leave the LU as it was: see the module's documentation.
    fn cleanup(&mut self) -> (Outcome, String) {
        let key = self.opts.key;
        let mut notes: Vec<String> = Vec::new();
        let mut ok = true;
        if let Some(name) = self.offline.take() {
            match self.lu.set_running(&name, true) {
                Err(e) => {
                    ok = false;
                    notes.push(format!("cannot set {name} running: {e}"));
                }
                Ok(()) => {
                    // Waited for even after a stop: the unregistration
                    // must reach this path too.
                    let start = Instant::now();
                    let mut back = false;
                    while start.elapsed() < self.opts.path_timeout {
                        if self.lu.path_state(&name).is_ok_and(|s| s.in_use()) {
                            back = true;
                            break;
                        }
                        self.lu.pause(POLL);
                    }
                    if back {
                        notes.push(format!("{name} running again"));
                    } else {
                        ok = false;
                        notes.push(format!(
                            "{name} set running, multipathd does not use it yet"
                        ));
                    }
                }
            }
        }
        if !self.registered {
            return (Outcome::Pass, "nothing was sent".into());
        }
        // A reservation carrying the test key: release it (never another's).
        if let Ok(look) = self.lu.look() {
            if let Some(r) = lu_reservation(&look).filter(|r| r.key == key) {
                match prout(self.lu, prout_sa::RELEASE, r.pr_type, key, 0) {
                    Ok(a) if a.status == Status::GOOD => notes.push("released".into()),
                    Ok(a) => notes.push(format!("RELEASE: {}", answer_text(&a))),
                    Err(e) => notes.push(format!("RELEASE: {e}")),
                }
            }
        }
        match prout(self.lu, prout_sa::REGISTER, 0, key, 0) {
            Ok(a) if a.status == Status::GOOD => {
                notes.push(format!("{} unregistered through reservd", hex(key)))
            }
            Ok(a) => notes.push(format!(
                "unregistering through reservd: {}",
                answer_text(&a)
            )),
            Err(e) => notes.push(format!("unregistering through reservd: {e}")),
        }
        // What is left, directly.
        match self.lu.look() {
            Err(e) => {
                return (
                    Outcome::Fail,
                    format!("{}; cannot read the paths: {e}", notes.join("; ")),
                )
            }
            Ok(look) => {
                for p in usable(&look).0 {
                    if p.own_keys.as_ref().is_ok_and(|k| k.contains(&key)) {
                        match self.lu.unregister_on_path(&p.name, key) {
                            Ok(()) => notes.push(format!("unregistered on {} directly", p.name)),
                            Err(e) => notes.push(format!("unregistering on {}: {e}", p.name)),
                        }
                    }
                }
                if look.map_key == Ok(Some(key)) {
                    match self.lu.forget_map_key() {
                        Ok(()) => notes.push("multipathd told to forget the key".into()),
                        Err(e) => notes.push(format!("multipathd: {e}")),
                    }
                }
            }
        }
        // The verdict: nothing of the test key left.
        let look = match self.lu.look() {
            Ok(l) => l,
            Err(e) => {
                return (
                    Outcome::Fail,
                    format!("{}; cannot read the paths: {e}", notes.join("; ")),
                )
            }
        };
        let mut left = Vec::new();
        match lu_keys(&look) {
            Ok(k) if k.contains(&key) => left.push(format!("the LU still lists {}", hex(key))),
            Ok(_) => {}
            Err(e) => left.push(format!("cannot read the LU's keys: {e}")),
        }
        if lu_reservation(&look).is_some_and(|r| r.key == key) {
            left.push("a reservation with the test key".into());
        }
        match &look.map_key {
            Ok(Some(k)) if *k == key => left.push(format!("multipathd still holds {}", hex(key))),
            Err(e) => left.push(format!("multipathd: {e}")),
            _ => {}
        }
        let (_, others) = usable(&look);
        if !others.is_empty() {
            left.push(format!("not usable, not checked: {}", others.join(", ")));
        }
        if left.is_empty() && ok {
            (Outcome::Pass, format!("{}; nothing left", notes.join("; ")))
        } else {
            notes.extend(left);
            (Outcome::Fail, notes.join("; "))
        }
    }
}

/// Run the checks on `lu`.
pub fn run(lu: &mut dyn Lu, opts: &Options) -> Report {
    run_with(lu, opts, &mut |_| {})
}

/// [`run`], telling `progress` of each check as it ends.
pub fn run_with(lu: &mut dyn Lu, opts: &Options, progress: &mut dyn FnMut(&Check)) -> Report {
    let mut r = Run {
        lu,
        opts,
        progress,
        report: Report {
            key: opts.key,
            checks: Vec::new(),
            interrupted: false,
        },
        stopped: None,
        registered: false,
        offline: None,
        foreign_reservation: None,
        last: None,
    };
    let key = opts.key;
    r.step("preflight", true, |r| r.preflight());
    if r.report.checks[0].outcome == Outcome::Refused {
        r.stopped = Some("the LU is in use (preflight)".into());
    }
    r.step("register", true, |r| {
        r.registered = true;
        r.command("REGISTER", prout_sa::REGISTER, 0, 0, key)
    });
    r.step("key_on_every_path", false, |r| r.key_on_every_path());
    r.step("multipathd_key", false, |r| r.multipathd_key(Some(key)));
    r.reservation_checks([
        "reserve",
        "reservation_on_every_path",
        "release",
        "released_on_every_path",
    ]);
    if opts.with_failover {
        r.step("failover_path_offline", true, |r| r.failover_offline());
        r.reservation_checks([
            "failover_reserve",
            "failover_reservation_on_every_path",
            "failover_release",
            "failover_released_on_every_path",
        ]);
        r.step("failover_path_back", true, |r| r.failover_back());
    }
    let (outcome, detail) = if r.report.checks[0].outcome == Outcome::Refused {
        (Outcome::Skip, "nothing was sent".to_string())
    } else {
        r.cleanup()
    };
    r.push("cleanup", outcome, detail);
    r.report
}

/// The width of the name column for a run with(out) the failover checks.
pub fn name_width(with_failover: bool) -> usize {
    check_names(with_failover)
        .iter()
        .map(|n| n.len())
        .max()
        .unwrap_or(0)
}

/// One check's line of the report, names `width` wide.
pub fn line(c: &Check, width: usize) -> String {
    format!("  {:<8} {:<width$}  {}", c.outcome.word(), c.name, c.detail)
}

/// The report for a person: one line per check, then the verdict.
pub fn text(header: &str, r: &Report) -> String {
    let mut o = format!("{header}\n");
    let width = r.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for c in &r.checks {
        let _ = writeln!(o, "{}", line(c, width));
    }
    o.push_str(&verdict_line(r));
    o
}

/// The report's last line.
pub fn verdict_line(r: &Report) -> String {
    let mut o = String::new();
    let count = |o: Outcome| r.checks.iter().filter(|c| c.outcome == o).count();
    let names = |o: Outcome| {
        r.checks
            .iter()
            .filter(|c| c.outcome == o)
            .map(|c| c.name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = match r.verdict() {
        Verdict::Passed => writeln!(
            o,
            "Verdict: PASSED ({} checks passed{})",
            count(Outcome::Pass),
            match count(Outcome::Skip) {
                0 => String::new(),
                n => format!(", {n} skipped"),
            }
        ),
        Verdict::Failed => writeln!(
            o,
            "Verdict: FAILED ({} of {} checks failed: {})",
            count(Outcome::Fail),
            r.checks.len(),
            names(Outcome::Fail)
        ),
        Verdict::Refused => writeln!(
            o,
            "Verdict: REFUSED (the LU is in use; nothing was changed)"
        ),
        Verdict::Interrupted => writeln!(
            o,
            "Verdict: INTERRUPTED (cleanup: {})",
            r.check("cleanup").map_or("not run", |c| c.outcome.word())
        ),
    };
    o
}

/// Where the run happened, for the JSON document.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub device: String,
    pub map: String,
    pub wwid: Option<String>,
    /// reservd's socket the commands went through.
    pub socket: String,
}

/// `reservdctl validate --json`: one document.
pub fn json(target: &Target, with_failover: bool, r: &Report) -> String {
    #[derive(Serialize)]
    struct Doc<'a> {
        #[serde(flatten)]
        target: &'a Target,
        key: Key,
        with_failover: bool,
        checks: &'a [Check],
        verdict: Verdict,
    }
    serde_json::to_string(&Doc {
        target,
        key: Key(r.key),
        with_failover,
        checks: &r.checks,
        verdict: r.verdict(),
    })
    .expect("the report serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(outcomes: &[(&'static str, Outcome)], interrupted: bool) -> Report {
        Report {
            key: TEST_KEY_PREFIX | 0xabc,
            checks: outcomes
                .iter()
                .map(|(n, o)| Check {
                    name: n,
                    outcome: *o,
                    detail: format!("{n} detail"),
                })
                .collect(),
            interrupted,
        }
    }

    #[test]
    fn verdicts_and_exit_codes() {
        let pass = report(&[("a", Outcome::Pass), ("b", Outcome::Skip)], false);
        assert_eq!((pass.verdict(), pass.exit_code()), (Verdict::Passed, 0));
        let fail = report(&[("a", Outcome::Pass), ("b", Outcome::Fail)], false);
        assert_eq!((fail.verdict(), fail.exit_code()), (Verdict::Failed, 5));
        let refused = report(&[("a", Outcome::Refused), ("b", Outcome::Skip)], false);
        assert_eq!(
            (refused.verdict(), refused.exit_code()),
            (Verdict::Refused, 6)
        );
        let stop = report(&[("a", Outcome::Pass), ("b", Outcome::Fail)], true);
        assert_eq!(
            (stop.verdict(), stop.exit_code()),
            (Verdict::Interrupted, 130)
        );
    }

    #[test]
    fn text_has_a_line_per_check_and_the_verdict() {
        let r = report(
            &[
                ("preflight", Outcome::Pass),
                ("register", Outcome::Fail),
                ("cleanup", Outcome::Pass),
            ],
            false,
        );
        assert_eq!(
            text("Validating X:", &r),
            "Validating X:\n  \
             PASS     preflight  preflight detail\n  \
             FAIL     register   register detail\n  \
             PASS     cleanup    cleanup detail\n\
             Verdict: FAILED (1 of 3 checks failed: register)\n"
        );
        let r = report(&[("preflight", Outcome::Refused)], false);
        assert!(
            text("h", &r).ends_with("Verdict: REFUSED (the LU is in use; nothing was changed)\n")
        );
    }

    #[test]
    fn json_is_one_document() {
        let r = report(
            &[("preflight", Outcome::Pass), ("cleanup", Outcome::Pass)],
            false,
        );
        let t = Target {
            device: "/dev/mapper/mpatha".into(),
            map: "mpatha".into(),
            wwid: None,
            socket: "/run/r.sock".into(),
        };
        assert_eq!(
            json(&t, true, &r),
            "{\"device\":\"/dev/mapper/mpatha\",\"map\":\"mpatha\",\"wwid\":null,\
             \"socket\":\"/run/r.sock\",\"key\":\"0x7273766400000abc\",\"with_failover\":true,\
             \"checks\":[{\"name\":\"preflight\",\"result\":\"pass\",\"detail\":\"preflight detail\"},\
             {\"name\":\"cleanup\",\"result\":\"pass\",\"detail\":\"cleanup detail\"}],\
             \"verdict\":\"passed\"}"
        );
    }

    #[test]
    fn path_states() {
        let s = |sysfs: &str, mpd: &str| PathState {
            sysfs: Some(sysfs.into()),
            multipathd: Some(mpd.into()),
        };
        assert!(s("offline", "failed faulty offline").failed());
        assert!(!s("offline", "active ready running").failed());
        assert!(s("running", "active ready running").in_use());
        assert!(!s("running", "failed ghost running").in_use());
        assert!(!s("offline", "active ready running").in_use());
        assert!(!PathState::default().in_use());
    }

    #[test]
    fn the_names_of_the_checks() {
        assert_eq!(check_names(false).len(), 9);
        let all = check_names(true);
        assert_eq!(all.len(), 15);
        assert_eq!(all[0], "preflight");
        assert_eq!(all[14], "cleanup");
    }
}
