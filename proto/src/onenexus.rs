//! A multipath map answers as one I_T nexus.
//!
//! A dm-multipath map reaches its logical unit through several I_T
//! nexuses, one per path, and SPC-4 applies persistent reservations per
//! nexus. A guest behind QEMU sees one disk and one initiator: for it, the
//! map must behave as one nexus. The answers it gets, the state other
//! nodes see, and which writes through each path of the map succeed must be
//! those of a single-path LU driven by one initiator, and reservd never
//! changes another node's registration or reservation except where SPC-4
//! says the command does (PREEMPT, PREEMPT AND ABORT, CLEAR).
//!
//! This module decides, without I/O, how a PR OUT on a map runs
//! ([`route`]), from what reservd reads of the LU first ([`MapState`]:
//! multipath-tools' key for the map, READ KEYS, READ RESERVATION), and
//! reduces PR IN data to what one nexus reports ([`read_keys_as_one`],
//! [`full_status_as_one`]). The rules:
//!
//! - A command that changes nothing at any path of the map, or that the
//!   device refuses, goes down one path ([`Route::OnePath`]: SG_IO on the
//!   map itself, the kernel picks the path): the device's own answer is the
//!   map's. That covers every command from an unregistered map or with a
//!   key other than the map's, a RELEASE when another node (or nobody)
//!   holds the reservation, an unregister of an unregistered map, and CDBs
//!   with an invalid type or scope. libmpathpersist is never given them:
//!   before multipath-tools 0.12 its RELEASE "released" another node's
//!   reservation by clearing the LU, and its key checks answer a wrong key
//!   with an error instead of RESERVATION CONFLICT.
//! - A REGISTER whose RESERVATION KEY is not the map's (or, from an
//!   unregistered map, not zero) is RESERVATION CONFLICT, and so is a
//!   RELEASE with a wrong key while the map holds the reservation. A RESERVE while
//!   the map holds the reservation through one of its paths is GOOD for the
//!   same type and scope and RESERVATION CONFLICT otherwise: what the
//!   holder nexus would answer, whichever path the kernel picks.
//! - Registrations go through libmpathpersist (every path, and multipathd
//!   learns the key for paths that come back) as REGISTER AND IGNORE
//!   EXISTING KEY once the key has been checked, so that paths that
//!   disagree for a moment (one just reinstated) cannot make it fail.
//! - Where the loaded libmpathpersist gets the map wrong ([`Fixes`],
//!   multipath-tools before 0.13), reservd runs the command itself on the
//!   paths as multipath-tools 0.13 does: RELEASE on every active path (and,
//!   if a path that is down holds the map's reservation, a move to an
//!   active path by PREEMPT and a RELEASE there, with the map suspended); a
//!   PREEMPT that removes the map's key from its other paths (its own key,
//!   or zero on an all-registrants reservation) with the map suspended and
//!   the key registered again on those paths before it resumes;
//!   unregistering while holding releases first; a key change while
//!   holding moves the reservation to the new key if a path that missed the
//!   change holds it.
//! - READ KEYS lists the map's key once, and READ FULL STATUS has one
//!   descriptor for it (the holder's, if a path of the map holds the
//!   reservation): one registration, as one nexus has.
//!
//! The map's key is the key multipath-tools keeps for it (multipathd's
//! `getprkey`), and the map is registered when the LU lists that key. A
//! reservation whose key is the map's is the map's: like libmpathpersist,
//! reservd assumes no other node registers the same key.
//!
//! Types 1 and 3 (Write Exclusive, Exclusive Access) have one holder
//! nexus: on a map, only the path that reserved may write (or read, for
//! Exclusive Access). No library can change that; reservd warns when a
//! guest uses them on a map ([`single_holder_type`]).
#![forbid(unsafe_code)]

use crate::cdb::{pr_type, prout_sa};
use crate::mpath_xlate::ProutRequest;
use crate::params::FLAG_SPEC_I_PT;
use crate::prin::{self, Reservation};
use crate::sense::{Answer, Status};

/// A multipath-tools version, as libmultipath reports it.
pub type Version = (u32, u32, u32);

/// The first multipath-tools release whose libmpathpersist keeps a map
/// one nexus for RELEASE and PREEMPT (suspend, preempt, register the
/// others again, resume).
pub const LIBRARY_KEEPS_ONE_NEXUS: Version = (0, 13, 0);

/// What reservd does itself because the loaded libmpathpersist would get
/// the map wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fixes {
    /// RELEASE of the map's reservation on every active path, moving it
    /// off a path that is down first (before 0.12 the library's fallback
    /// cleared the LU, taking other nodes' registrations and reservations;
    /// 0.12 still clears it when the holding path is down).
    pub release: bool,
    /// PREEMPT that removes the map's key from its other paths: register
    /// it again on them, with the map suspended meanwhile.
    pub preempt_own_paths: bool,
    /// Unregistering, or changing the key, while the map holds the
    /// reservation: release it first, or move it to the new key.
    pub holder_key_changes: bool,
}

impl Fixes {
    /// Every fix, for a library whose version is unknown or before 0.13.
    pub const ALL: Fixes = Fixes {
        release: true,
        preempt_own_paths: true,
        holder_key_changes: true,
    };
    /// None: the library does it right.
    pub const NONE: Fixes = Fixes {
        release: false,
        preempt_own_paths: false,
        holder_key_changes: false,
    };

    /// The fixes a library of `version` needs (`None`: too old to say).
    pub fn for_version(version: Option<Version>) -> Fixes {
        match version {
            Some(v) if v >= LIBRARY_KEEPS_ONE_NEXUS => Fixes::NONE,
            _ => Fixes::ALL,
        }
    }

    /// One line per fix applied, for `reservdctl check` and the start-up log.
    pub fn describe(self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.release {
            out.push(
                "RELEASE runs on every path of the map (the library's fallback would clear the \
                 LU, other nodes' registrations included)",
            );
        }
        if self.preempt_own_paths {
            out.push(
                "a PREEMPT of the map's own key (or of an all-registrants reservation) registers \
                 the key again on the map's other paths, with the map suspended",
            );
        }
        if self.holder_key_changes {
            out.push(
                "unregistering or changing the key while the map holds the reservation releases \
                 it or moves it to the new key, even when the path holding it is down",
            );
        }
        out
    }
}

/// What reservd reads of the LU before a PR OUT on a map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    /// The key multipath-tools keeps for the map (multipathd's prkey).
    pub map_key: Option<u64>,
    /// The registered keys (READ KEYS), one per registered I_T nexus.
    pub keys: Vec<u64>,
    /// The persistent reservation (READ RESERVATION); the key of an
    /// all-registrants reservation is 0.
    pub reservation: Option<Reservation>,
}

impl MapState {
    /// The map's registration key: multipath-tools' key for it, when the
    /// LU lists it.
    pub fn own_key(&self) -> Option<u64> {
        self.map_key.filter(|k| *k != 0 && self.keys.contains(k))
    }

    /// Whether the map holds a reservation that has one holder (types 1,
    /// 3, 5, 6): the reservation's key is the map's.
    pub fn holds_alone(&self) -> bool {
        match (self.reservation, self.own_key()) {
            (Some(r), Some(k)) => !pr_type::is_all_registrants(r.pr_type) && r.key == k,
            _ => false,
        }
    }

    /// Whether the map is a holder: it holds the reservation alone, or it
    /// is registered and the reservation is an all-registrants one.
    pub fn is_holder(&self) -> bool {
        match self.reservation {
            Some(r) if pr_type::is_all_registrants(r.pr_type) => self.own_key().is_some(),
            Some(_) => self.holds_alone(),
            None => false,
        }
    }
}

/// The fields of a PR OUT that decide its route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prout {
    pub service_action: u8,
    pub scope: u8,
    pub pr_type: u8,
    pub key: u64,
    pub sa_key: u64,
    pub spec_i_pt: bool,
}

impl Prout {
    /// The fields of a PR OUT as libmpathpersist would be given it.
    pub fn of(req: &ProutRequest) -> Prout {
        Prout {
            service_action: req.service_action,
            scope: req.scope,
            pr_type: req.pr_type,
            key: u64::from_be_bytes(req.header[0..8].try_into().unwrap()),
            sa_key: req.sa_key(),
            spec_i_pt: req.header[20] & FLAG_SPEC_I_PT != 0,
        }
    }
}

/// How a PR OUT on a map runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// The answer, with no command sent.
    Answer(Answer),
    /// Down one path, unchanged: it changes nothing at any path of the
    /// map, or the device refuses it.
    OnePath,
    /// Through libmpathpersist, unchanged.
    Library,
    /// Through libmpathpersist as REGISTER AND IGNORE EXISTING KEY with
    /// the command's SERVICE ACTION RESERVATION KEY (its key was checked).
    LibraryRegister,
    /// RELEASE on every active path; then, if the reservation is still
    /// held with the command's key, type and scope (a path that is down
    /// holds it), a move to an active path and a RELEASE there, with the
    /// map suspended.
    ReleaseOnPaths,
    /// [`Route::ReleaseOnPaths`], then the library unregisters.
    ReleaseThenUnregister,
    /// The PREEMPT down one active path with the map suspended, then the
    /// map's key registered again on its other active paths (if the
    /// sending path still holds it) before the map resumes.
    PreemptOwnPaths,
    /// [`Route::LibraryRegister`]; then, if the reservation still carries
    /// the old key (a path that missed the change holds it), a PREEMPT
    /// moving it to the new key.
    ChangeKeyHolding { old: u64 },
}

impl Route {
    /// Every route's name, in the order of [`Route::index`].
    pub const NAMES: [&'static str; 8] = [
        "answer",
        "one_path",
        "library",
        "library_register",
        "release_on_paths",
        "release_then_unregister",
        "preempt_own_paths",
        "change_key_holding",
    ];

    /// The route's place in [`Route::NAMES`].
    pub fn index(&self) -> usize {
        match self {
            Route::Answer(_) => 0,
            Route::OnePath => 1,
            Route::Library => 2,
            Route::LibraryRegister => 3,
            Route::ReleaseOnPaths => 4,
            Route::ReleaseThenUnregister => 5,
            Route::PreemptOwnPaths => 6,
            Route::ChangeKeyHolding { .. } => 7,
        }
    }

    /// The route's name, as reservd's metrics label it.
    pub fn name(&self) -> &'static str {
        Route::NAMES[self.index()]
    }
}

fn conflict() -> Answer {
    Answer::status(Status::RESERVATION_CONFLICT)
}

/// Whether the CDB's type and scope are ones a device accepts for RESERVE
/// and PREEMPT (LU_SCOPE, one of the six types).
fn valid_type_and_scope(c: &Prout) -> bool {
    c.scope == 0 && pr_type::is_valid(c.pr_type)
}

/// How to run `c` on a map in state `st` (`None`: the state could not be
/// read, e.g. multipathd does not answer), given the fixes the loaded
/// library needs.
pub fn route(c: &Prout, st: Option<&MapState>, fixes: Fixes) -> Route {
    let Some(st) = st else {
        // Without the map's key nothing can be judged; only RELEASE is
        // still kept away from a library that may clear the LU.
        return if c.service_action == prout_sa::RELEASE && fixes.release {
            Route::ReleaseOnPaths
        } else {
            Route::Library
        };
    };
    let own = st.own_key();
    match c.service_action {
        prout_sa::REGISTER | prout_sa::REGISTER_AND_IGNORE => {
            if c.service_action == prout_sa::REGISTER && c.key != own.unwrap_or(0) {
                return Route::Answer(conflict());
            }
            if c.spec_i_pt {
                return Route::Library;
            }
            match own {
                // Unregistering an unregistered map.
                None if c.sa_key == 0 => Route::OnePath,
                None => Route::LibraryRegister,
                Some(_) if c.sa_key == 0 && st.holds_alone() && fixes.holder_key_changes => {
                    Route::ReleaseThenUnregister
                }
                Some(k)
                    if c.sa_key != 0
                        && c.sa_key != k
                        && st.holds_alone()
                        && fixes.holder_key_changes =>
                {
                    Route::ChangeKeyHolding { old: k }
                }
                Some(_) => Route::LibraryRegister,
            }
        }
        prout_sa::RESERVE => {
            if !valid_type_and_scope(c) || own != Some(c.key) {
                return Route::OnePath;
            }
            match st.reservation {
                None => Route::Library,
                Some(r) if st.holds_alone() => {
                    if r.pr_type == c.pr_type && r.scope == c.scope {
                        Route::Answer(Answer::status(Status::GOOD))
                    } else {
                        Route::Answer(conflict())
                    }
                }
                // Another node's, or all registrants' (every path of the
                // map is a holder): the device answers.
                Some(_) => Route::OnePath,
            }
        }
        prout_sa::RELEASE => {
            if own.is_some() && own != Some(c.key) && st.holds_alone() {
                // The holder nexus refuses a wrong key; the path the kernel
                // picks may not be the holder (which would answer GOOD).
                Route::Answer(conflict())
            } else if own != Some(c.key) || !st.is_holder() {
                Route::OnePath
            } else if fixes.release {
                Route::ReleaseOnPaths
            } else {
                Route::Library
            }
        }
        prout_sa::CLEAR => {
            if own != Some(c.key) {
                Route::OnePath
            } else {
                Route::Library
            }
        }
        prout_sa::PREEMPT | prout_sa::PREEMPT_AND_ABORT => {
            if !valid_type_and_scope(c) || own != Some(c.key) {
                return Route::OnePath;
            }
            let all_registrants = st
                .reservation
                .is_some_and(|r| pr_type::is_all_registrants(r.pr_type));
            if c.sa_key == 0 && !all_registrants {
                // INVALID FIELD IN PARAMETER LIST, from the device.
                return Route::OnePath;
            }
            let strips_own_paths = own == Some(c.sa_key) || c.sa_key == 0;
            if strips_own_paths && fixes.preempt_own_paths {
                Route::PreemptOwnPaths
            } else {
                Route::Library
            }
        }
        // REGISTER AND MOVE and the rest are refused before routing.
        _ => Route::Library,
    }
}

/// Whether `t` has a single holder nexus (Write Exclusive, Exclusive
/// Access): on a map, only the path that reserved may write.
pub fn single_holder_type(t: u8) -> bool {
    matches!(t, pr_type::WRITE_EXCLUSIVE | pr_type::EXCLUSIVE_ACCESS)
}

/// READ KEYS data (the device's, whole) with the map's key `own` listed
/// once, at its first place: one registration, as one nexus has.
pub fn read_keys_as_one(data: &[u8], own: u64) -> Vec<u8> {
    let Ok((generation, keys, _)) = prin::parse_read_keys(data) else {
        return data.to_vec();
    };
    let mut seen = false;
    let kept: Vec<u64> = keys
        .into_iter()
        .filter(|&k| {
            if k != own {
                return true;
            }
            !std::mem::replace(&mut seen, true)
        })
        .collect();
    prin::read_keys(generation, &kept)
}

/// READ FULL STATUS data (the device's, whole) with one descriptor for the
/// map's key `own`: the one that holds the reservation if one does, else
/// the first, at the place of the first.
pub fn full_status_as_one(data: &[u8], own: u64) -> Vec<u8> {
    let Ok((generation, descs)) = prin::parse_read_full_status(data) else {
        return data.to_vec();
    };
    let holder = descs
        .iter()
        .position(|d| d.key == own && d.reservation_holder);
    let first = descs.iter().position(|d| d.key == own);
    let Some(first) = first else {
        return data.to_vec();
    };
    let chosen = holder.unwrap_or(first);
    let kept: Vec<prin::FullStatusDescriptor> = descs
        .iter()
        .enumerate()
        .filter_map(|(i, d)| {
            if d.key != own {
                Some(d.clone())
            } else if i == first {
                Some(descs[chosen].clone())
            } else {
                None
            }
        })
        .collect();
    prin::read_full_status(generation, &kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_names() {
        let routes = [
            Route::Answer(conflict()),
            Route::OnePath,
            Route::Library,
            Route::LibraryRegister,
            Route::ReleaseOnPaths,
            Route::ReleaseThenUnregister,
            Route::PreemptOwnPaths,
            Route::ChangeKeyHolding { old: 1 },
        ];
        let names: Vec<&str> = routes.iter().map(Route::name).collect();
        assert_eq!(names, Route::NAMES);
        assert_eq!(
            Route::ChangeKeyHolding { old: 7 }.name(),
            "change_key_holding"
        );
    }
    use crate::cdb::pr_type::*;
    use crate::cdb::prout_sa::*;

    const K: u64 = 0xaaaa;
    const OTHER: u64 = 0xbbbb;

    fn cmd(sa: u8, t: u8, key: u64, sa_key: u64) -> Prout {
        Prout {
            service_action: sa,
            scope: 0,
            pr_type: t,
            key,
            sa_key,
            spec_i_pt: false,
        }
    }

    fn res(key: u64, t: u8) -> Option<Reservation> {
        Some(Reservation {
            key,
            scope: 0,
            pr_type: t,
        })
    }

    /// The map registered with K on two paths, node 2 with OTHER.
    fn registered(reservation: Option<Reservation>) -> MapState {
        MapState {
            map_key: Some(K),
            keys: vec![K, OTHER, K],
            reservation,
        }
    }

    fn unregistered(reservation: Option<Reservation>) -> MapState {
        MapState {
            map_key: None,
            keys: vec![OTHER],
            reservation,
        }
    }

    fn r(c: Prout, st: &MapState) -> Route {
        route(&c, Some(st), Fixes::ALL)
    }

    #[test]
    fn the_map_key_counts_only_when_the_lu_lists_it() {
        // multipathd still has the key of a map another node preempted.
        let fenced = MapState {
            map_key: Some(K),
            keys: vec![OTHER],
            reservation: res(OTHER, 5),
        };
        assert_eq!(fenced.own_key(), None);
        assert!(!fenced.is_holder());
        assert_eq!(registered(None).own_key(), Some(K));
        assert!(registered(res(K, WRITE_EXCLUSIVE_REGISTRANTS_ONLY)).holds_alone());
        // All registrants: every registrant holds it, nobody alone.
        let ar = registered(res(0, WRITE_EXCLUSIVE_ALL_REGISTRANTS));
        assert!(ar.is_holder() && !ar.holds_alone());
        assert!(!unregistered(res(0, 7)).is_holder());
        // A zero key is never the map's.
        let zero = MapState {
            map_key: Some(0),
            keys: vec![0],
            reservation: None,
        };
        assert_eq!(zero.own_key(), None);
    }

    #[test]
    fn release_by_a_non_holder_never_reaches_the_library() {
        // Node 2 holds a type 5 reservation; the map releases with its key.
        let st = registered(res(OTHER, 5));
        assert_eq!(r(cmd(RELEASE, 5, K, 0), &st), Route::OnePath);
        // Nothing reserved, or an unregistered map, or a wrong key: the
        // same, whatever the library's release.
        for fixes in [Fixes::ALL, Fixes::NONE] {
            for st in [registered(None), unregistered(res(OTHER, 5))] {
                assert_eq!(
                    route(&cmd(RELEASE, 5, K, 0), Some(&st), fixes),
                    Route::OnePath
                );
            }
            // A wrong key while the map holds the reservation: the
            // holder's answer, whichever path the kernel picks.
            let st = registered(res(K, 5));
            assert_eq!(
                route(&cmd(RELEASE, 5, 0x9999, 0), Some(&st), fixes),
                Route::Answer(conflict())
            );
            // All registrants: every registered path holds it, any answers.
            let st = registered(res(0, 7));
            assert_eq!(
                route(&cmd(RELEASE, 7, 0x9999, 0), Some(&st), fixes),
                Route::OnePath
            );
        }
    }

    #[test]
    fn release_of_the_maps_reservation_runs_on_every_path_before_0_13() {
        let st = registered(res(K, 5));
        assert_eq!(r(cmd(RELEASE, 5, K, 0), &st), Route::ReleaseOnPaths);
        // A different type from the holder: every path answers, the
        // holder's answer is the map's.
        assert_eq!(r(cmd(RELEASE, 6, K, 0), &st), Route::ReleaseOnPaths);
        // All registrants: every path of the map holds it.
        let st = registered(res(0, WRITE_EXCLUSIVE_ALL_REGISTRANTS));
        assert_eq!(r(cmd(RELEASE, 7, K, 0), &st), Route::ReleaseOnPaths);
        // 0.13 and later do it right.
        let st = registered(res(K, 5));
        assert_eq!(
            route(&cmd(RELEASE, 5, K, 0), Some(&st), Fixes::NONE),
            Route::Library
        );
        // Unknown state: never the library's release before 0.13.
        assert_eq!(
            route(&cmd(RELEASE, 5, K, 0), None, Fixes::ALL),
            Route::ReleaseOnPaths
        );
        assert_eq!(
            route(&cmd(RELEASE, 5, K, 0), None, Fixes::NONE),
            Route::Library
        );
        assert_eq!(
            route(&cmd(RESERVE, 5, K, 0), None, Fixes::ALL),
            Route::Library
        );
    }

    #[test]
    fn register_checks_the_key_as_one_nexus() {
        // Registered map, wrong key: RESERVATION CONFLICT (the library
        // would answer an error).
        let st = registered(None);
        assert_eq!(
            r(cmd(REGISTER, 0, 0x9999, 0x1), &st),
            Route::Answer(conflict())
        );
        assert_eq!(r(cmd(REGISTER, 0, 0, 0x1), &st), Route::Answer(conflict()));
        // Unregistered map: a non-zero key conflicts.
        let st = unregistered(None);
        assert_eq!(
            r(cmd(REGISTER, 0, 0x9999, 0x1), &st),
            Route::Answer(conflict())
        );
        // REGISTER AND IGNORE EXISTING KEY ignores it.
        assert_eq!(
            r(cmd(REGISTER_AND_IGNORE, 0, 0x9999, 0x1), &st),
            Route::LibraryRegister
        );
        // Registering, changing the key, unregistering.
        assert_eq!(r(cmd(REGISTER, 0, 0, K), &st), Route::LibraryRegister);
        let st = registered(None);
        assert_eq!(r(cmd(REGISTER, 0, K, 0x77), &st), Route::LibraryRegister);
        assert_eq!(r(cmd(REGISTER, 0, K, 0), &st), Route::LibraryRegister);
        // Unregistering an unregistered map changes nothing: one path.
        let st = unregistered(None);
        assert_eq!(r(cmd(REGISTER, 0, 0, 0), &st), Route::OnePath);
        assert_eq!(r(cmd(REGISTER_AND_IGNORE, 0, 5, 0), &st), Route::OnePath);
        // SPEC_I_PT goes to the library as it is.
        let mut c = cmd(REGISTER, 0, 0, K);
        c.spec_i_pt = true;
        assert_eq!(r(c, &st), Route::Library);
    }

    #[test]
    fn unregistering_or_changing_the_key_while_holding() {
        let st = registered(res(K, 5));
        assert_eq!(r(cmd(REGISTER, 0, K, 0), &st), Route::ReleaseThenUnregister);
        assert_eq!(
            r(cmd(REGISTER_AND_IGNORE, 0, 0, 0), &st),
            Route::ReleaseThenUnregister
        );
        assert_eq!(
            r(cmd(REGISTER, 0, K, 0x77), &st),
            Route::ChangeKeyHolding { old: K }
        );
        // The same key again is no change.
        assert_eq!(r(cmd(REGISTER, 0, K, K), &st), Route::LibraryRegister);
        // All registrants: the reservation stays with the others.
        let st = registered(res(0, 7));
        assert_eq!(r(cmd(REGISTER, 0, K, 0), &st), Route::LibraryRegister);
        // 0.13 does it.
        let st = registered(res(K, 5));
        assert_eq!(
            route(&cmd(REGISTER, 0, K, 0), Some(&st), Fixes::NONE),
            Route::LibraryRegister
        );
    }

    #[test]
    fn reserve_while_holding_is_the_holders_answer() {
        let st = registered(res(K, 5));
        assert_eq!(
            r(cmd(RESERVE, 5, K, 0), &st),
            Route::Answer(Answer::status(Status::GOOD))
        );
        assert_eq!(r(cmd(RESERVE, 6, K, 0), &st), Route::Answer(conflict()));
        // Whatever the library version: it is the one-nexus answer.
        assert_eq!(
            route(&cmd(RESERVE, 5, K, 0), Some(&st), Fixes::NONE),
            Route::Answer(Answer::status(Status::GOOD))
        );
        // Nobody holds it: the library reserves through one path.
        assert_eq!(r(cmd(RESERVE, 5, K, 0), &registered(None)), Route::Library);
        // Another node holds it, or all registrants do: the device answers.
        assert_eq!(
            r(cmd(RESERVE, 5, K, 0), &registered(res(OTHER, 5))),
            Route::OnePath
        );
        assert_eq!(
            r(cmd(RESERVE, 7, K, 0), &registered(res(0, 7))),
            Route::OnePath
        );
        // Refusals: unregistered, wrong key, invalid type or scope.
        assert_eq!(
            r(cmd(RESERVE, 5, K, 0), &unregistered(None)),
            Route::OnePath
        );
        assert_eq!(
            r(cmd(RESERVE, 5, 0x9, 0), &registered(None)),
            Route::OnePath
        );
        assert_eq!(r(cmd(RESERVE, 2, K, 0), &registered(None)), Route::OnePath);
        let mut c = cmd(RESERVE, 5, K, 0);
        c.scope = 1;
        assert_eq!(r(c, &registered(None)), Route::OnePath);
    }

    #[test]
    fn preempts_that_strip_the_maps_other_paths() {
        // Its own key, to change the type (or as QEMU's migration does).
        let st = registered(res(K, 5));
        assert_eq!(r(cmd(PREEMPT, 6, K, K), &st), Route::PreemptOwnPaths);
        assert_eq!(
            r(cmd(PREEMPT_AND_ABORT, 5, K, K), &st),
            Route::PreemptOwnPaths
        );
        // Own key with no reservation: still removes its other paths.
        assert_eq!(
            r(cmd(PREEMPT, 5, K, K), &registered(None)),
            Route::PreemptOwnPaths
        );
        // Zero on an all-registrants reservation removes every other
        // registration, the map's other paths included.
        let st = registered(res(0, 7));
        assert_eq!(r(cmd(PREEMPT, 5, K, 0), &st), Route::PreemptOwnPaths);
        // Zero otherwise: the device refuses it.
        assert_eq!(
            r(cmd(PREEMPT, 5, K, 0), &registered(res(K, 5))),
            Route::OnePath
        );
        // Fencing another node: the library, through one path.
        assert_eq!(
            r(cmd(PREEMPT, 5, K, OTHER), &registered(res(OTHER, 5))),
            Route::Library
        );
        // 0.13 and later suspend and register again themselves.
        assert_eq!(
            route(
                &cmd(PREEMPT, 6, K, K),
                Some(&registered(res(K, 5))),
                Fixes::NONE
            ),
            Route::Library
        );
        // Refused ones go down one path.
        assert_eq!(
            r(cmd(PREEMPT, 5, K, OTHER), &unregistered(None)),
            Route::OnePath
        );
        assert_eq!(
            r(cmd(PREEMPT, 5, 0x9, OTHER), &registered(None)),
            Route::OnePath
        );
        assert_eq!(
            r(cmd(PREEMPT, 4, K, OTHER), &registered(None)),
            Route::OnePath
        );
    }

    #[test]
    fn clear_needs_the_maps_key() {
        assert_eq!(
            r(cmd(CLEAR, 0, K, 0), &registered(res(OTHER, 5))),
            Route::Library
        );
        assert_eq!(r(cmd(CLEAR, 0, 0x9, 0), &registered(None)), Route::OnePath);
        assert_eq!(r(cmd(CLEAR, 0, K, 0), &unregistered(None)), Route::OnePath);
    }

    #[test]
    fn fixes_follow_the_library_version() {
        assert_eq!(Fixes::for_version(None), Fixes::ALL);
        assert_eq!(Fixes::for_version(Some((0, 9, 4))), Fixes::ALL);
        assert_eq!(Fixes::for_version(Some((0, 11, 1))), Fixes::ALL);
        assert_eq!(Fixes::for_version(Some((0, 12, 2))), Fixes::ALL);
        assert_eq!(Fixes::for_version(Some((0, 13, 0))), Fixes::NONE);
        assert_eq!(Fixes::for_version(Some((0, 15, 1))), Fixes::NONE);
        assert_eq!(Fixes::ALL.describe().len(), 3);
        assert!(Fixes::NONE.describe().is_empty());
    }

    #[test]
    fn read_keys_lists_the_maps_key_once() {
        let d = prin::read_keys(7, &[K, OTHER, K, 0x5, K]);
        let one = read_keys_as_one(&d, K);
        assert_eq!(one, prin::read_keys(7, &[K, OTHER, 0x5]));
        // Without the map's key, unchanged.
        assert_eq!(read_keys_as_one(&d, 0x42), d);
        // Garbage is passed on as it is.
        assert_eq!(read_keys_as_one(&[1, 2], K), vec![1, 2]);
    }

    fn desc(key: u64, holder: bool, port: u16, tid: u8) -> prin::FullStatusDescriptor {
        prin::FullStatusDescriptor {
            key,
            all_tg_pt: false,
            reservation_holder: holder,
            scope: 0,
            pr_type: if holder { 5 } else { 0 },
            relative_target_port: port,
            transport_id: vec![tid; 24],
        }
    }

    #[test]
    fn full_status_has_one_descriptor_for_the_map() {
        // Path 2 holds the reservation: its descriptor stands for the map,
        // at the place of the map's first.
        let d = prin::read_full_status(
            3,
            &[
                desc(K, false, 1, 0xa1),
                desc(OTHER, false, 3, 0xc1),
                desc(K, true, 2, 0xa2),
            ],
        );
        let one = full_status_as_one(&d, K);
        assert_eq!(
            one,
            prin::read_full_status(3, &[desc(K, true, 2, 0xa2), desc(OTHER, false, 3, 0xc1)])
        );
        // Nobody holds it: the first.
        let d = prin::read_full_status(
            3,
            &[
                desc(OTHER, true, 3, 0xc1),
                desc(K, false, 1, 0xa1),
                desc(K, false, 2, 0xa2),
            ],
        );
        assert_eq!(
            full_status_as_one(&d, K),
            prin::read_full_status(3, &[desc(OTHER, true, 3, 0xc1), desc(K, false, 1, 0xa1)])
        );
        assert_eq!(full_status_as_one(&d, 0x42), d);
    }

    #[test]
    fn single_holder_types() {
        assert!(single_holder_type(1) && single_holder_type(3));
        assert!(![5, 6, 7, 8].iter().any(|&t| single_holder_type(t)));
    }
}
