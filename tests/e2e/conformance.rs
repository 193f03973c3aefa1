//! The conformance group: a dm-multipath map driven through reservd is,
//! for the guest and for every other node of the cluster, ONE I_T nexus.
//!
//! Two nodes share a LU. Node 1 is a guest: reservd, driven over its socket
//! as QEMU drives it, with the fd of `/dev/mapper/<map>` (two paths, two
//! nexuses). Node 2 is another cluster node: raw SG_IO on a third nexus to
//! the same LU, kept out of the map. Every sequence below is also run on
//! the oracle: the same steps with node 1 = reservd on a single-path LU
//! (one nexus, SG_IO pass-through) and node 2 on a second nexus to it. The
//! oracle is LIO itself, so nothing here encodes what reservd answers
//! today. Compared, step by step:
//!
//! - the answer: status, sense key/ASC/ASCQ, PR IN data without its
//!   PRgeneration. Node 1's READ KEYS is a multiset of keys and its READ
//!   FULL STATUS a multiset of (node, key, holder, scope, type)
//!   descriptors: one nexus lists its key once (`≠ per path` marks an
//!   answer that lists it once per path). Node 2 reads the LU itself,
//!   where the map has a nexus per path: its READ KEYS and READ FULL
//!   STATUS are compared at the node level;
//! - after each PR OUT, the device state as node 2 reads it (READ FULL
//!   STATUS), reduced to the node level: which node is registered with
//!   which key (node 1's paths must agree), which node holds the
//!   reservation, its type and scope (all registrants for types 7 and 8);
//! - after each PR OUT, a WRITE and a READ through every usable path of the
//!   map, whose SCSI status (GOOD or RESERVATION CONFLICT) must be the
//!   oracle's single nexus's, and node 2's WRITE and READ. With types 1 and
//!   3 held by node 1, only the nexus that reserved is the holder (SPC-4):
//!   the map's other path cannot write (nor, for type 3, read) whatever the
//!   helper does. Those rows are marked as a documented exception and kept
//!   out of the verdict, as long as the holder path and node 2 match.
//!
//! Unit attentions are not compared: multipathd's path checker takes them
//! on the map's paths at moments of its own, so every command is repeated
//! past them, as an initiator does, and the first other answer counts.
//!
//! Each sequence runs from a reset LU (node 2 CLEARs, multipathd forgets
//! the map's key), then once more with one path of the map offline
//! (multipathd shows it `failed faulty`); at the end that path is brought
//! back and must carry the map's key again (or none, if the map has none)
//! within a few multipathd check intervals. Debian's qemu-pr-helper (plain
//! SG_IO on the map: one path) runs the online sequences as a baseline,
//! informational only.
//!
//! PREEMPT AND ABORT is not run: between two tcm_loop nexuses it deadlocks
//! LIO on these kernels (core_tmr_lun_reset waits for the work item that
//! runs the command), on Debian's 6.1 and 6.12 alike.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reservd_client::client::Client;
use reservd_daemon::backend::sgio::{sg_io, Transfer};
use reservd_proto::cdb::{pr_type, prin_sa, prout_sa, PrInCdb, PrOutCdb};
use reservd_proto::params::{ProutParams, TransportId};
use reservd_proto::prin;
use reservd_proto::sense::{Answer, SenseCode};

use crate::guest::{helper, reservd, Scenario, TestResult};

pub fn scenarios() -> Vec<Scenario> {
    vec![("conformance_map_is_one_nexus", map_is_one_nexus)]
}

// ---- keys -------------------------------------------------------------------------

/// Node 1's key, and the one it changes to.
const K1: u64 = 0xa1;
const K1B: u64 = 0xa2;
/// Node 2's key.
const K2: u64 = 0xb1;
/// A key nobody holds.
const WRONG: u64 = 0xee;
/// The key node 2 takes to CLEAR the LU between sequences.
const RESET_KEY: u64 = 0x5e7;

/// SCSI status values.
const GOOD: u8 = 0x00;
const CHECK: u8 = 0x02;
const CONFLICT: u8 = 0x18;

/// A command through reservd slower than this is listed after the table
/// (not a failure: the map's answers are compared, not their speed).
const SLOW: Duration = Duration::from_secs(2);
/// How long a command through a helper may take before the run counts it
/// as unanswered (and starts the helper again).
const HELPER_TIMEOUT: Duration = Duration::from_secs(60);
/// Timeout of each SG_IO the suite sends itself.
const SG_TIMEOUT_MS: u32 = 10_000;
/// The block the WRITE and READ probes use (1 MiB into a 64 MiB LU with
/// 512-byte blocks; further in with larger blocks, still inside it).
const PROBE_LBA: u32 = 2048;

// ---- sequences ----------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Node {
    N1,
    N2,
}

impl Node {
    fn name(self) -> &'static str {
        match self {
            Node::N1 => "N1",
            Node::N2 => "N2",
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Cmd {
    Out {
        sa: u8,
        ty: u8,
        key: u64,
        sa_key: u64,
    },
    In {
        sa: u8,
    },
    /// A path of node 1's map goes down or comes back (nothing on a LU
    /// with one nexus per node: the oracle's state must not change).
    Path(PathAction),
}

#[derive(Clone, Copy, Debug)]
enum PathAction {
    /// Path `i` of the map goes offline (multipathd shows it failed).
    Down(usize),
    /// The path through which node 1 holds its reservation goes offline.
    HolderDown,
    /// Every path taken offline comes back, and carries the map's key
    /// again (or none, if the map has none) as reinstatement promises.
    AllUp,
}

/// What SPC-4 says of a step, checked on the oracle only: a bed where the
/// single-path LU does not behave so is not the bed this suite needs.
#[derive(Clone, Copy, Debug)]
enum Fact {
    Status(u8),
    /// `node` holds a reservation of this type.
    Holds(Node, u8),
    /// An all-registrants reservation of this type exists.
    AllRegistrants(u8),
    NoReservation,
    /// `node`'s registration (None: not registered).
    Key(Node, Option<u64>),
}

struct Step {
    name: &'static str,
    by: Node,
    cmd: Cmd,
    spc4: &'static [Fact],
}

struct Sequence {
    name: &'static str,
    steps: Vec<Step>,
}

fn out(name: &'static str, by: Node, sa: u8, ty: u8, key: u64, sa_key: u64) -> Step {
    Step {
        name,
        by,
        cmd: Cmd::Out {
            sa,
            ty,
            key,
            sa_key,
        },
        spc4: &[],
    }
}

fn register(name: &'static str, by: Node, old: u64, new: u64) -> Step {
    out(name, by, prout_sa::REGISTER, 0, old, new)
}

fn reserve(name: &'static str, by: Node, ty: u8, key: u64) -> Step {
    out(name, by, prout_sa::RESERVE, ty, key, 0)
}

fn release(name: &'static str, by: Node, ty: u8, key: u64) -> Step {
    out(name, by, prout_sa::RELEASE, ty, key, 0)
}

fn path(name: &'static str, a: PathAction) -> Step {
    Step {
        name,
        by: N1,
        cmd: Cmd::Path(a),
        spc4: &[],
    }
}

fn inq(name: &'static str, by: Node, sa: u8) -> Step {
    Step {
        name,
        by,
        cmd: Cmd::In { sa },
        spc4: &[],
    }
}

impl Step {
    fn spc4(mut self, facts: &'static [Fact]) -> Step {
        self.spc4 = facts;
        self
    }
}

impl Sequence {
    /// It takes paths down itself: no second run with a path offline.
    fn moves_paths(&self) -> bool {
        self.steps.iter().any(|s| matches!(s.cmd, Cmd::Path(_)))
    }
}

use Node::{N1, N2};

/// Step names of `every_type`, one set per type (names are `&'static str`).
macro_rules! type_names {
    ($t:literal) => {
        [
            concat!("type", $t),
            concat!("n1_reserves_type", $t),
            concat!("n2_reserves_type", $t, "_while_n1_holds"),
            concat!("n1_releases_type", $t),
            concat!("n2_reserves_type", $t),
            concat!("n1_reserves_type", $t, "_while_n2_holds"),
            concat!("n2_releases_type", $t),
            concat!("n1_reserves_type", $t, "_again"),
            "n1_read_full_status",
        ]
    };
}

const TYPE_NAMES: [[&str; 9]; 6] = [
    type_names!(1),
    type_names!(3),
    type_names!(5),
    type_names!(6),
    type_names!(7),
    type_names!(8),
];

fn sequences() -> Vec<Sequence> {
    let mut v = vec![
        Sequence {
            name: "n1_registers_first",
            steps: vec![
                register("n1_registers", N1, 0, K1).spc4(&[Fact::Key(N1, Some(K1))]),
                register("n2_registers", N2, 0, K2),
                inq("n1_read_keys", N1, prin_sa::READ_KEYS),
                reserve("n1_reserves_type5", N1, 5, K1).spc4(&[Fact::Holds(N1, 5)]),
                reserve("n2_reserve_conflicts", N2, 5, K2).spc4(&[Fact::Status(CONFLICT)]),
                inq("n1_read_reservation", N1, prin_sa::READ_RESERVATION),
                inq("n1_read_full_status", N1, prin_sa::READ_FULL_STATUS),
                inq("n1_report_capabilities", N1, prin_sa::REPORT_CAPABILITIES),
                inq("n2_read_keys", N2, prin_sa::READ_KEYS),
            ],
        },
        Sequence {
            name: "n2_registers_first",
            steps: vec![
                register("n2_registers", N2, 0, K2),
                reserve("n2_reserves_type5", N2, 5, K2),
                register("n1_registers", N1, 0, K1),
                reserve("n1_reserve_conflicts", N1, 5, K1).spc4(&[Fact::Status(CONFLICT)]),
                inq("n1_read_reservation", N1, prin_sa::READ_RESERVATION),
                inq("n1_read_keys", N1, prin_sa::READ_KEYS),
                release("n2_releases", N2, 5, K2),
                reserve("n1_reserves_type5", N1, 5, K1).spc4(&[Fact::Holds(N1, 5)]),
                inq("n1_read_full_status", N1, prin_sa::READ_FULL_STATUS),
            ],
        },
        Sequence {
            name: "release",
            steps: vec![
                register("n1_registers", N1, 0, K1),
                register("n2_registers", N2, 0, K2),
                reserve("n2_reserves_type5", N2, 5, K2),
                release(
                    "release_by_non_holder_keeps_other_nodes_reservation",
                    N1,
                    5,
                    K1,
                )
                .spc4(&[
                    Fact::Status(GOOD),
                    Fact::Holds(N2, 5),
                    Fact::Key(N2, Some(K2)),
                    Fact::Key(N1, Some(K1)),
                ]),
                inq("n1_read_reservation", N1, prin_sa::READ_RESERVATION),
                reserve("n1_reserve_conflicts", N1, 5, K1),
                release("n2_releases", N2, 5, K2).spc4(&[Fact::NoReservation]),
                reserve("n1_reserves_type5", N1, 5, K1),
                release("n2_release_by_non_holder", N2, 5, K2)
                    .spc4(&[Fact::Status(GOOD), Fact::Holds(N1, 5)]),
                release("n1_release_with_the_wrong_type", N1, 6, K1).spc4(&[Fact::Holds(N1, 5)]),
                release("n1_releases", N1, 5, K1).spc4(&[
                    Fact::Status(GOOD),
                    Fact::NoReservation,
                    Fact::Key(N1, Some(K1)),
                ]),
                release("n1_release_without_a_reservation", N1, 5, K1).spc4(&[Fact::Status(GOOD)]),
                reserve("n1_reserves_type5_again", N1, 5, K1),
            ],
        },
        Sequence {
            name: "n2_preempts_n1",
            steps: vec![
                register("n1_registers", N1, 0, K1),
                reserve("n1_reserves_type5", N1, 5, K1),
                register("n2_registers", N2, 0, K2),
                out("n2_preempts_n1", N2, prout_sa::PREEMPT, 5, K2, K1).spc4(&[
                    Fact::Status(GOOD),
                    Fact::Holds(N2, 5),
                    Fact::Key(N1, None),
                ]),
                inq("n1_read_keys", N1, prin_sa::READ_KEYS),
                reserve("n1_reserve_as_a_non_registrant", N1, 5, K1)
                    .spc4(&[Fact::Status(CONFLICT)]),
                register("n1_registers_again_with_a_new_key", N1, 0, K1B)
                    .spc4(&[Fact::Status(GOOD), Fact::Key(N1, Some(K1B))]),
                inq("n1_read_reservation", N1, prin_sa::READ_RESERVATION),
            ],
        },
        Sequence {
            name: "n1_preempts_n2",
            steps: vec![
                register("n2_registers", N2, 0, K2),
                reserve("n2_reserves_type5", N2, 5, K2),
                register("n1_registers", N1, 0, K1),
                out("n1_preempts_n2", N1, prout_sa::PREEMPT, 5, K1, K2).spc4(&[
                    Fact::Status(GOOD),
                    Fact::Holds(N1, 5),
                    Fact::Key(N2, None),
                ]),
                inq("n1_read_full_status", N1, prin_sa::READ_FULL_STATUS),
                register("n2_registers_again", N2, 0, K2),
                out(
                    "n1_preempts_registrant_n2",
                    N1,
                    prout_sa::PREEMPT,
                    5,
                    K1,
                    K2,
                )
                .spc4(&[Fact::Holds(N1, 5), Fact::Key(N2, None)]),
                inq("n1_read_keys", N1, prin_sa::READ_KEYS),
            ],
        },
        Sequence {
            name: "self_preempt",
            steps: vec![
                register("n1_registers", N1, 0, K1),
                register("n2_registers", N2, 0, K2),
                reserve("n1_reserves_type5", N1, 5, K1),
                out(
                    "self_preempt_keeps_every_path_registered",
                    N1,
                    prout_sa::PREEMPT,
                    6,
                    K1,
                    K1,
                )
                .spc4(&[
                    Fact::Status(GOOD),
                    Fact::Holds(N1, 6),
                    Fact::Key(N1, Some(K1)),
                    Fact::Key(N2, Some(K2)),
                ]),
                inq("n1_read_reservation", N1, prin_sa::READ_RESERVATION),
                inq("n1_read_keys", N1, prin_sa::READ_KEYS),
                reserve("n2_reserve_conflicts", N2, 6, K2),
            ],
        },
        Sequence {
            name: "clear",
            steps: vec![
                register("n1_registers", N1, 0, K1),
                register("n2_registers", N2, 0, K2),
                reserve("n2_reserves_type5", N2, 5, K2),
                out(
                    "n1_clear_with_a_wrong_key",
                    N1,
                    prout_sa::CLEAR,
                    0,
                    WRONG,
                    0,
                )
                .spc4(&[Fact::Status(CONFLICT), Fact::Holds(N2, 5)]),
                out("n1_clears", N1, prout_sa::CLEAR, 0, K1, 0).spc4(&[
                    Fact::Status(GOOD),
                    Fact::NoReservation,
                    Fact::Key(N1, None),
                    Fact::Key(N2, None),
                ]),
                inq("n1_read_keys", N1, prin_sa::READ_KEYS),
                // SPC-4 says RESERVATION CONFLICT; LIO answers NOT READY,
                // LOGICAL UNIT COMMUNICATION FAILURE (core_scsi3_emulate_pro_clear).
                // The map must answer as the LU does.
                out("n1_clear_unregistered", N1, prout_sa::CLEAR, 0, K1, 0)
                    .spc4(&[Fact::NoReservation]),
                register("n1_registers_again", N1, 0, K1),
                reserve("n1_reserves_type5", N1, 5, K1),
                register("n2_registers_again", N2, 0, K2),
                out("n2_clears", N2, prout_sa::CLEAR, 0, K2, 0)
                    .spc4(&[Fact::NoReservation, Fact::Key(N1, None)]),
                register("n1_registers_after_n2_cleared", N1, 0, K1)
                    .spc4(&[Fact::Status(GOOD), Fact::Key(N1, Some(K1))]),
            ],
        },
        Sequence {
            name: "register_and_ignore",
            steps: vec![
                out(
                    "n1_register_and_ignore",
                    N1,
                    prout_sa::REGISTER_AND_IGNORE,
                    0,
                    0,
                    K1,
                )
                .spc4(&[Fact::Key(N1, Some(K1))]),
                reserve("n1_reserves_type5", N1, 5, K1),
                out(
                    "n1_register_and_ignore_replaces_the_key",
                    N1,
                    prout_sa::REGISTER_AND_IGNORE,
                    0,
                    WRONG,
                    K1B,
                )
                .spc4(&[
                    Fact::Status(GOOD),
                    Fact::Key(N1, Some(K1B)),
                    Fact::Holds(N1, 5),
                ]),
                inq("n1_read_reservation", N1, prin_sa::READ_RESERVATION),
                reserve("n1_reserve_with_the_replaced_key", N1, 5, K1)
                    .spc4(&[Fact::Status(CONFLICT)]),
                register("n2_registers", N2, 0, K2),
                inq("n1_read_keys", N1, prin_sa::READ_KEYS),
            ],
        },
        Sequence {
            name: "wrong_keys",
            steps: vec![
                register("n1_registers", N1, 0, K1),
                register(
                    "register_with_wrong_key_is_reservation_conflict",
                    N1,
                    WRONG,
                    K1B,
                )
                .spc4(&[Fact::Status(CONFLICT), Fact::Key(N1, Some(K1))]),
                inq("n1_read_keys", N1, prin_sa::READ_KEYS),
                reserve(
                    "reserve_with_wrong_key_is_reservation_conflict",
                    N1,
                    5,
                    WRONG,
                )
                .spc4(&[Fact::Status(CONFLICT), Fact::NoReservation]),
                reserve("n1_reserves_type5", N1, 5, K1),
                release(
                    "release_with_wrong_key_is_reservation_conflict",
                    N1,
                    5,
                    WRONG,
                )
                .spc4(&[Fact::Status(CONFLICT), Fact::Holds(N1, 5)]),
                register("n2_registers", N2, 0, K2),
                out(
                    "preempt_with_wrong_key_is_reservation_conflict",
                    N1,
                    prout_sa::PREEMPT,
                    5,
                    WRONG,
                    K2,
                )
                .spc4(&[Fact::Status(CONFLICT), Fact::Key(N2, Some(K2))]),
            ],
        },
        Sequence {
            name: "release_with_the_wrong_type",
            steps: vec![
                register("n1_registers", N1, 0, K1),
                register("n2_registers", N2, 0, K2),
                reserve("n1_reserves_type5", N1, 5, K1),
                // SPC-4: CHECK CONDITION, INVALID RELEASE OF PERSISTENT
                // RESERVATION; LIO answers RESERVATION CONFLICT. Either
                // way nothing changes.
                release(
                    "release_with_the_wrong_type_keeps_the_reservation",
                    N1,
                    6,
                    K1,
                )
                .spc4(&[
                    Fact::Holds(N1, 5),
                    Fact::Key(N1, Some(K1)),
                    Fact::Key(N2, Some(K2)),
                ]),
                inq("n1_read_reservation", N1, prin_sa::READ_RESERVATION),
            ],
        },
        Sequence {
            name: "unregister_while_holding",
            steps: vec![
                register("n1_registers", N1, 0, K1),
                register("n2_registers", N2, 0, K2),
                reserve("n1_reserves_type5", N1, 5, K1),
                register(
                    "unregister_while_holding_releases_the_reservation",
                    N1,
                    K1,
                    0,
                )
                .spc4(&[
                    Fact::Status(GOOD),
                    Fact::NoReservation,
                    Fact::Key(N1, None),
                ]),
                inq("n2_read_reservation", N2, prin_sa::READ_RESERVATION),
                register("n1_registers_again", N1, 0, K1),
                reserve("n1_reserves_type7", N1, 7, K1),
                register(
                    "unregister_while_holding_all_registrants_keeps_the_reservation",
                    N1,
                    K1,
                    0,
                )
                .spc4(&[
                    Fact::Status(GOOD),
                    Fact::AllRegistrants(7),
                    Fact::Key(N1, None),
                ]),
                inq("n1_read_reservation", N1, prin_sa::READ_RESERVATION),
                register("n1_registers_once_more", N1, 0, K1),
            ],
        },
        // Paths failing and coming back in the middle of a sequence (run
        // once: the map's paths are what they are about).
        Sequence {
            name: "reserved_through_the_second_path",
            steps: vec![
                register("n1_registers", N1, 0, K1),
                path("path1_fails", PathAction::Down(0)),
                reserve("n1_reserves_type5_through_path2", N1, 5, K1).spc4(&[Fact::Holds(N1, 5)]),
                path("path1_returns", PathAction::AllUp),
                inq("n1_read_reservation", N1, prin_sa::READ_RESERVATION),
                release(
                    "release_with_wrong_key_is_reservation_conflict",
                    N1,
                    5,
                    WRONG,
                )
                .spc4(&[Fact::Status(CONFLICT), Fact::Holds(N1, 5)]),
                register("n2_registers", N2, 0, K2),
                release("release_with_wrong_key_with_n2_registered", N1, 5, WRONG)
                    .spc4(&[Fact::Status(CONFLICT), Fact::Holds(N1, 5)]),
                release(
                    "release_with_the_wrong_type_keeps_the_reservation",
                    N1,
                    6,
                    K1,
                )
                .spc4(&[Fact::Holds(N1, 5), Fact::Key(N2, Some(K2))]),
                reserve("n2_reserve_conflicts", N2, 5, K2).spc4(&[Fact::Status(CONFLICT)]),
                out(
                    "self_preempt_keeps_every_path_registered",
                    N1,
                    prout_sa::PREEMPT,
                    6,
                    K1,
                    K1,
                )
                .spc4(&[Fact::Holds(N1, 6), Fact::Key(N2, Some(K2))]),
                release("n1_releases", N1, 6, K1).spc4(&[Fact::Status(GOOD), Fact::NoReservation]),
                inq("n1_read_keys", N1, prin_sa::READ_KEYS),
            ],
        },
        Sequence {
            name: "holder_path_fails",
            steps: vec![
                register("n1_registers", N1, 0, K1),
                register("n2_registers", N2, 0, K2),
                reserve("n1_reserves_type5", N1, 5, K1),
                path("holder_path_fails", PathAction::HolderDown),
                inq("n1_read_reservation", N1, prin_sa::READ_RESERVATION),
                reserve("n2_reserve_conflicts", N2, 5, K2).spc4(&[Fact::Status(CONFLICT)]),
                release(
                    "release_while_the_holder_path_is_down_keeps_other_nodes_registered",
                    N1,
                    5,
                    K1,
                )
                .spc4(&[
                    Fact::Status(GOOD),
                    Fact::NoReservation,
                    Fact::Key(N2, Some(K2)),
                ]),
                reserve("n1_reserves_type5_again", N1, 5, K1).spc4(&[Fact::Holds(N1, 5)]),
                path("holder_path_returns", PathAction::AllUp),
                inq("n1_read_keys", N1, prin_sa::READ_KEYS),
                release("n1_releases", N1, 5, K1).spc4(&[Fact::NoReservation]),
            ],
        },
        Sequence {
            name: "preempted_while_a_path_is_down",
            steps: vec![
                register("n1_registers", N1, 0, K1),
                reserve("n1_reserves_type5", N1, 5, K1),
                register("n2_registers", N2, 0, K2),
                path("path2_fails", PathAction::Down(1)),
                out("n2_preempts_n1", N2, prout_sa::PREEMPT, 5, K2, K1)
                    .spc4(&[Fact::Holds(N2, 5), Fact::Key(N1, None)]),
                path("fenced_path_returns_unregistered", PathAction::AllUp),
                inq("n1_read_keys", N1, prin_sa::READ_KEYS),
                out(
                    "n1_registers_again_ignoring_the_old_key",
                    N1,
                    prout_sa::REGISTER_AND_IGNORE,
                    0,
                    0,
                    K1B,
                )
                .spc4(&[Fact::Key(N1, Some(K1B))]),
            ],
        },
    ];
    for ty in [1u8, 3, 5, 6, 7, 8] {
        v.push(every_type(ty));
    }
    v
}

/// Both nodes registered; node 1 reserves `ty`, releases, node 2 reserves
/// it, releases, node 1 reserves it again (and keeps it).
fn every_type(ty: u8) -> Sequence {
    let all = pr_type::is_all_registrants(ty);
    let names: &[&'static str; 9] = match ty {
        1 => &TYPE_NAMES[0],
        3 => &TYPE_NAMES[1],
        5 => &TYPE_NAMES[2],
        6 => &TYPE_NAMES[3],
        7 => &TYPE_NAMES[4],
        _ => &TYPE_NAMES[5],
    };
    let held_by_n1: &'static [Fact] = match ty {
        1 => &[Fact::Holds(N1, 1)],
        3 => &[Fact::Holds(N1, 3)],
        5 => &[Fact::Holds(N1, 5)],
        6 => &[Fact::Holds(N1, 6)],
        7 => &[Fact::AllRegistrants(7)],
        _ => &[Fact::AllRegistrants(8)],
    };
    // A registered non-holder's RESERVE of the same type: RESERVATION
    // CONFLICT, except that with all-registrants types every registrant is
    // a holder (GOOD).
    let second: &'static [Fact] = if all {
        &[Fact::Status(GOOD)]
    } else {
        &[Fact::Status(CONFLICT)]
    };
    Sequence {
        name: names[0],
        steps: vec![
            register("n1_registers", N1, 0, K1),
            register("n2_registers", N2, 0, K2),
            reserve(names[1], N1, ty, K1).spc4(held_by_n1),
            inq("n1_read_reservation", N1, prin_sa::READ_RESERVATION),
            reserve(names[2], N2, ty, K2).spc4(second),
            release(names[3], N1, ty, K1),
            reserve(names[4], N2, ty, K2),
            inq(
                "n1_read_reservation_held_by_n2",
                N1,
                prin_sa::READ_RESERVATION,
            ),
            reserve(names[5], N1, ty, K1).spc4(second),
            release(names[6], N2, ty, K2),
            reserve(names[7], N1, ty, K1).spc4(held_by_n1),
            inq(names[8], N1, prin_sa::READ_FULL_STATUS),
        ],
    }
}

// ---- the test bed -------------------------------------------------------------------

fn var(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| {
        format!(
            "{name} is not set: this group needs the test bed's second node \
             (RESERVD_N2_*: a third nexus to the map's LU, a second one to the single-path LU)"
        )
    })
}

/// One I_T nexus the suite sends SG_IO on itself.
struct Nexus {
    /// `sda` for a path of the map, `n1` / `n2` otherwise.
    label: String,
    node: Node,
    /// Initiator port name, e.g. `naa.500140500000a001`.
    initiator: String,
    /// The path's block device (map paths: the one taken offline).
    block: Option<String>,
    sg: File,
}

impl Nexus {
    fn open(
        label: &str,
        node: Node,
        initiator: &str,
        block: Option<&str>,
        sg: &str,
    ) -> Result<Nexus, String> {
        let sg = OpenOptions::new()
            .read(true)
            .write(true)
            .open(sg)
            .map_err(|e| format!("opening {sg}: {e}"))?;
        Ok(Nexus {
            label: label.to_string(),
            node,
            initiator: initiator.to_ascii_lowercase(),
            block: block.map(String::from),
            sg,
        })
    }
}

fn block_name(dev: &str) -> String {
    dev.trim_start_matches("/dev/").to_string()
}

/// One LU as a run sees it: the device node 1's helper gets, node 1's
/// nexuses, node 2's.
struct Lu {
    what: &'static str,
    node1_dev: PathBuf,
    node1: Vec<Nexus>,
    node2: Nexus,
    block_len: usize,
    /// The map's dm minor (multipathd commands), for the map only.
    dm_minor: Option<u32>,
}

impl Lu {
    fn map() -> Result<Lu, String> {
        let paths: Vec<String> = var("RESERVD_MP_PATHS")?
            .split_whitespace()
            .map(String::from)
            .collect();
        let sgs: Vec<String> = var("RESERVD_MP_SGS")?
            .split_whitespace()
            .map(String::from)
            .collect();
        let inits: Vec<String> = var("RESERVD_MP_INITIATORS")?
            .split_whitespace()
            .map(String::from)
            .collect();
        if paths.len() != 2 || sgs.len() != 2 || inits.len() != 2 {
            return Err(format!(
                "the map must have two paths: {paths:?} {sgs:?} {inits:?}"
            ));
        }
        let mut node1 = Vec::new();
        for i in 0..2 {
            let b = block_name(&paths[i]);
            node1.push(Nexus::open(&b, N1, &inits[i], Some(&b), &sgs[i])?);
        }
        let n2_dev = var("RESERVD_N2_MP_DEV")?;
        let node2 = Nexus::open(
            "n2",
            N2,
            &var("RESERVD_N2_MP_INITIATOR")?,
            Some(&block_name(&n2_dev)),
            &var("RESERVD_N2_MP_SG")?,
        )?;
        let dm = var("RESERVD_MP_DM")?;
        let rdev = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&dm)
                .map_err(|e| format!("{dm}: {e}"))?
                .rdev()
        };
        let mut lu = Lu {
            what: "map",
            node1_dev: PathBuf::from(var("RESERVD_MP_DEV")?),
            node1,
            node2,
            block_len: 0,
            dm_minor: Some(libc::minor(rdev)),
        };
        lu.block_len = lu.read_block_len()?;
        // Node 2 must be a nexus of its own, outside the map.
        let slaves = format!("/sys/block/{}/slaves", block_name(&dm));
        let held: Vec<String> = std::fs::read_dir(&slaves)
            .map_err(|e| format!("{slaves}: {e}"))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if lu.node2.block.as_ref().is_some_and(|b| held.contains(b)) {
            return Err(format!(
                "node 2's nexus {n2_dev} is a path of the map ({held:?})"
            ));
        }
        for p in &lu.node1 {
            if !held.contains(p.block.as_ref().unwrap()) {
                return Err(format!("{} is not a path of the map ({held:?})", p.label));
            }
        }
        Ok(lu)
    }

    fn single_path() -> Result<Lu, String> {
        let dev = var("RESERVD_SP_DEV")?;
        let node1 = vec![Nexus::open(
            "n1",
            N1,
            &var("RESERVD_SP_INITIATOR")?,
            None,
            &var("RESERVD_SP_SG")?,
        )?];
        let node2 = Nexus::open(
            "n2",
            N2,
            &var("RESERVD_N2_SP_INITIATOR")?,
            None,
            &var("RESERVD_N2_SP_SG")?,
        )?;
        let mut lu = Lu {
            what: "single-path LU",
            node1_dev: PathBuf::from(dev),
            node1,
            node2,
            block_len: 0,
            dm_minor: None,
        };
        lu.block_len = lu.read_block_len()?;
        Ok(lu)
    }

    fn read_block_len(&self) -> Result<usize, String> {
        let r = sg_cmd(
            &self.node2.sg,
            &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            Io::In(8),
        );
        if r.status != GOOD || r.data.len() < 8 {
            return Err(format!("READ CAPACITY on {}: {}", self.what, r.text()));
        }
        Ok(u32::from_be_bytes(r.data[4..8].try_into().unwrap()) as usize)
    }

    fn nexuses(&self) -> impl Iterator<Item = &Nexus> {
        self.node1.iter().chain(std::iter::once(&self.node2))
    }

    /// The nexus a READ FULL STATUS TransportID names.
    fn nexus_of(&self, tid: &[u8]) -> Option<&Nexus> {
        let name = tid_name(tid);
        self.nexuses().find(|n| n.initiator == name)
    }
}

/// A TransportID as an initiator port name (tcm_loop's initiators show
/// as SAS addresses: `naa.` and the address).
fn tid_name(tid: &[u8]) -> String {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    match TransportId::parse(tid) {
        Ok((TransportId::Sas { address }, _)) => format!("naa.{}", hex(&address)),
        Ok((TransportId::Fc { n_port_name }, _)) => format!("naa.{}", hex(&n_port_name)),
        Ok((TransportId::Iscsi { name, .. }, _)) => {
            String::from_utf8_lossy(&name).to_ascii_lowercase()
        }
        Err(_) => format!("tid {}", hex(tid)),
    }
}

// ---- commands -------------------------------------------------------------------------

/// One SCSI answer, from the device or through a helper.
struct Reply {
    status: u8,
    sense: Option<SenseCode>,
    data: Vec<u8>,
}

impl Reply {
    fn unit_attention(&self) -> bool {
        self.sense.is_some_and(|c| c.key == 0x06)
    }

    fn text(&self) -> String {
        status_text(self.status, self.sense.map(|c| (c.key, c.asc, c.ascq)))
    }
}

fn status_text(status: u8, sense: Option<(u8, u8, u8)>) -> String {
    match (status, sense) {
        (GOOD, _) => "GOOD".into(),
        (CONFLICT, _) => "RESV CONFLICT".into(),
        (CHECK, Some((k, a, q))) => format!("CHECK {k:02x}/{a:02x}/{q:02x}"),
        (s, _) => format!("status {s:#04x}"),
    }
}

enum Io<'a> {
    None,
    Out(&'a [u8]),
    In(usize),
}

fn sg_cmd(f: &File, cdb: &[u8], io: Io<'_>) -> Reply {
    let mut buf = Vec::new();
    let xfer = match io {
        Io::None => Transfer::None,
        Io::Out(b) => Transfer::ToDevice(b),
        Io::In(n) => {
            buf = vec![0u8; n];
            Transfer::FromDevice(&mut buf)
        }
    };
    let (answer, transferred) = sg_io(f.as_fd(), cdb, xfer, SG_TIMEOUT_MS);
    buf.truncate(transferred);
    Reply {
        status: answer.status.0,
        sense: answer.sense_code(),
        data: if answer.status.0 == GOOD {
            buf
        } else {
            Vec::new()
        },
    }
}

/// Repeat a command while it answers with a unit attention, as an
/// initiator does; the first other answer.
fn past_ua(mut f: impl FnMut() -> Result<Reply, String>) -> Result<Reply, String> {
    let mut last = None;
    for _ in 0..6 {
        let r = f()?;
        if !r.unit_attention() {
            return Ok(r);
        }
        last = Some(r.text());
    }
    Err(format!(
        "unit attentions kept coming ({})",
        last.unwrap_or_default()
    ))
}

fn encode(cmd: Cmd) -> ([u8; 10], Vec<u8>) {
    match cmd {
        Cmd::Path(a) => unreachable!("{a:?} is no SCSI command"),
        Cmd::In { sa } => (
            PrInCdb {
                service_action: sa,
                allocation_length: 8192,
            }
            .encode(),
            Vec::new(),
        ),
        Cmd::Out {
            sa,
            ty,
            key,
            sa_key,
        } => {
            let params = ProutParams {
                key,
                sa_key,
                ..Default::default()
            }
            .encode();
            let cdb = PrOutCdb {
                service_action: sa,
                scope: 0,
                pr_type: ty,
                parameter_list_length: params.len() as u32,
            }
            .encode();
            (cdb, params)
        }
    }
}

/// A PR command on a nexus with SG_IO (node 2, the reset).
fn sg_pr(f: &File, cmd: Cmd) -> Result<Reply, String> {
    let (cdb, params) = encode(cmd);
    past_ua(|| {
        Ok(match cmd {
            Cmd::In { .. } => sg_cmd(f, &cdb, Io::In(8192)),
            _ => sg_cmd(f, &cdb, Io::Out(&params)),
        })
    })
}

/// A PR command through a helper, with the device's fd, as QEMU sends it.
fn helper_pr(c: &mut Client, dev: &File, cmd: Cmd) -> Result<Reply, String> {
    let (cdb, params) = encode(cmd);
    past_ua(|| {
        let r: Answer = c
            .execute(&cdb, dev.as_fd(), &params)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    format!("no answer within {}", secs(HELPER_TIMEOUT))
                }
                _ => format!("the helper closed the connection or failed: {e}"),
            })?;
        Ok(Reply {
            status: r.status.0,
            sense: r.sense_code(),
            data: r.data,
        })
    })
}

// ---- answers, as compared ---------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
enum Data {
    None,
    /// READ KEYS: the keys, sorted (a multiset).
    Keys(Vec<u64>),
    /// READ RESERVATION: (key, scope, type).
    Reservation(Option<(u64, u8, u8)>),
    Bytes(String),
    /// READ FULL STATUS: (node, key, holder, scope, type), sorted.
    Full(Vec<(String, u64, bool, u8, u8)>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Ans {
    status: u8,
    sense: Option<(u8, u8, u8)>,
    data: Data,
}

/// The answer as compared. Node 1 is the guest: its answers must be a
/// single nexus's (a key listed once per path differs). Node 2 reads the
/// LU itself, where node 1's map has a nexus per path: its READ KEYS and
/// READ FULL STATUS are compared at the node level.
fn answer(lu: &Lu, by: Node, cmd: Cmd, r: &Reply) -> Ans {
    let a = raw_answer(lu, cmd, r);
    match by {
        N1 => a,
        N2 => a.node_level(),
    }
}

fn raw_answer(lu: &Lu, cmd: Cmd, r: &Reply) -> Ans {
    let data = match cmd {
        Cmd::In { sa } if r.status == GOOD => match sa {
            prin_sa::READ_KEYS => match prin::parse_read_keys(&r.data) {
                Ok((_, mut k, _)) => {
                    k.sort_unstable();
                    Data::Keys(k)
                }
                Err(_) => Data::Bytes(reservd_client::report::hex(&r.data)),
            },
            prin_sa::READ_RESERVATION => match prin::parse_read_reservation(&r.data) {
                Ok((_, res)) => Data::Reservation(res.map(|x| (x.key, x.scope, x.pr_type))),
                Err(_) => Data::Bytes(reservd_client::report::hex(&r.data)),
            },
            prin_sa::READ_FULL_STATUS => match prin::parse_read_full_status(&r.data) {
                Ok((_, descs)) => {
                    let mut v: Vec<_> = descs
                        .iter()
                        .map(|d| {
                            let who = lu
                                .nexus_of(&d.transport_id)
                                .map(|n| n.node.name().to_string())
                                .unwrap_or_else(|| tid_name(&d.transport_id));
                            (who, d.key, d.reservation_holder, d.scope, d.pr_type)
                        })
                        .collect();
                    v.sort();
                    Data::Full(v)
                }
                Err(_) => Data::Bytes(reservd_client::report::hex(&r.data)),
            },
            _ => Data::Bytes(reservd_client::report::hex(&r.data)),
        },
        _ => Data::None,
    };
    Ans {
        status: r.status,
        sense: r.sense.map(|c| (c.key, c.asc, c.ascq)),
        data,
    }
}

impl Ans {
    /// One entry per node: READ KEYS as a set, READ FULL STATUS one
    /// descriptor per node and key (holder if any of them is).
    fn node_level(&self) -> Ans {
        let data = match &self.data {
            Data::Keys(k) => {
                let mut k = k.clone();
                k.dedup();
                Data::Keys(k)
            }
            Data::Full(v) => {
                let mut out: Vec<(String, u64, bool, u8, u8)> = Vec::new();
                for (who, k, h, sc, t) in v {
                    match out.iter_mut().find(|e| e.0 == *who && e.1 == *k) {
                        Some(e) if *h => (e.2, e.3, e.4) = (true, *sc, *t),
                        Some(_) => {}
                        None => out.push((who.clone(), *k, *h, *sc, *t)),
                    }
                }
                out.sort();
                Data::Full(out)
            }
            d => d.clone(),
        };
        Ans {
            data,
            ..self.clone()
        }
    }

    fn text(&self) -> String {
        let mut s = status_text(self.status, self.sense);
        match &self.data {
            Data::None => {}
            Data::Keys(k) => {
                let k: Vec<String> = k.iter().map(|k| format!("{k:x}")).collect();
                let _ = write!(s, " keys [{}]", k.join(" "));
            }
            Data::Reservation(None) => s.push_str(" no reservation"),
            Data::Reservation(Some((k, sc, t))) => {
                let _ = write!(s, " key {k:x} type {t}");
                if *sc != 0 {
                    let _ = write!(s, " scope {sc}");
                }
            }
            Data::Bytes(b) => {
                let _ = write!(s, " {b}");
            }
            Data::Full(v) => {
                let d: Vec<String> = v
                    .iter()
                    .map(|(who, k, h, sc, t)| {
                        if *h {
                            format!(
                                "{who}:{k:x}*t{t}{}",
                                if *sc != 0 {
                                    format!("s{sc}")
                                } else {
                                    String::new()
                                }
                            )
                        } else {
                            format!("{who}:{k:x}")
                        }
                    })
                    .collect();
                let _ = write!(s, " [{}]", d.join(" "));
            }
        }
        s
    }
}

// ---- device state -------------------------------------------------------------------------

/// One nexus's part of the device state.
#[derive(Clone, Debug, PartialEq, Eq)]
struct NexusState {
    label: String,
    node: Node,
    online: bool,
    key: Option<u64>,
    holder: bool,
}

/// The device state per nexus, as node 2 reads it (READ FULL STATUS).
#[derive(Clone, Debug)]
struct Raw {
    nexuses: Vec<NexusState>,
    /// (scope, type) of the reservation.
    res: Option<(u8, u8)>,
    /// Registrations of initiators that are neither node.
    strangers: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Reg {
    Not,
    Key(u64),
    /// Node 1's usable paths disagree.
    Split(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Holder {
    Node(Node),
    /// Types 7 and 8: every registrant is a holder.
    AllRegistrants,
    Several(String),
}

/// The node-level view: what one nexus per node would show.
#[derive(Clone, Debug, PartialEq, Eq)]
struct View {
    n1: Reg,
    n2: Reg,
    /// (holder, type, scope)
    res: Option<(Holder, u8, u8)>,
    strangers: Vec<String>,
}

fn read_raw(lu: &Lu, offline: &[String]) -> Result<Raw, String> {
    let r = sg_pr(
        &lu.node2.sg,
        Cmd::In {
            sa: prin_sa::READ_FULL_STATUS,
        },
    )?;
    if r.status != GOOD {
        return Err(format!(
            "READ FULL STATUS from node 2 on the {}: {}",
            lu.what,
            r.text()
        ));
    }
    let (_, descs) =
        prin::parse_read_full_status(&r.data).map_err(|_| "short READ FULL STATUS".to_string())?;
    let mut nexuses: Vec<NexusState> = lu
        .nexuses()
        .map(|n| NexusState {
            label: n.label.clone(),
            node: n.node,
            online: !offline.contains(&n.label),
            key: None,
            holder: false,
        })
        .collect();
    let mut res = None;
    let mut strangers = Vec::new();
    for d in &descs {
        if d.reservation_holder {
            res = Some((d.scope, d.pr_type));
        }
        match lu.nexus_of(&d.transport_id).map(|n| n.label.clone()) {
            Some(label) => {
                let n = nexuses.iter_mut().find(|n| n.label == label).unwrap();
                n.key = Some(d.key);
                n.holder = d.reservation_holder;
            }
            None => strangers.push(format!("{}: {:x}", tid_name(&d.transport_id), d.key)),
        }
    }
    Ok(Raw {
        nexuses,
        res,
        strangers,
    })
}

fn key_text(k: Option<u64>) -> String {
    k.map_or("-".into(), |k| format!("{k:x}"))
}

impl Raw {
    fn view(&self) -> View {
        let reg = |node: Node| {
            let online: Vec<&NexusState> = self
                .nexuses
                .iter()
                .filter(|n| n.node == node && n.online)
                .collect();
            let keys: BTreeSet<Option<u64>> = online.iter().map(|n| n.key).collect();
            match keys.len() {
                0 => Reg::Split("no usable nexus".into()),
                1 => match keys.into_iter().next().unwrap() {
                    Some(k) => Reg::Key(k),
                    None => Reg::Not,
                },
                _ => Reg::Split(
                    online
                        .iter()
                        .map(|n| format!("{} {}", n.label, key_text(n.key)))
                        .collect::<Vec<_>>()
                        .join(", "),
                ),
            }
        };
        let res = self.res.map(|(scope, ty)| {
            let holders: BTreeSet<Node> = self
                .nexuses
                .iter()
                .filter(|n| n.holder)
                .map(|n| n.node)
                .collect();
            let h = if pr_type::is_all_registrants(ty) {
                Holder::AllRegistrants
            } else if holders.len() == 1 {
                Holder::Node(*holders.iter().next().unwrap())
            } else {
                Holder::Several(format!("{holders:?}"))
            };
            (h, ty, scope)
        });
        View {
            n1: reg(N1),
            n2: reg(N2),
            res,
            strangers: self.strangers.clone(),
        }
    }

    /// Per nexus: `sda a1*` (`*`: holder), `sdb -`, `(sdb offline)`.
    fn text(&self) -> String {
        self.nexuses
            .iter()
            .map(|n| {
                format!(
                    "{} {}{}{}",
                    n.label,
                    key_text(n.key),
                    if n.holder { "*" } else { "" },
                    if n.online { "" } else { " (offline)" }
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The node-1 nexus holding a reservation, if exactly one does.
    fn n1_holder(&self) -> Option<&str> {
        let h: Vec<&NexusState> = self
            .nexuses
            .iter()
            .filter(|n| n.node == N1 && n.holder)
            .collect();
        (h.len() == 1).then(|| h[0].label.as_str())
    }
}

impl View {
    fn text(&self) -> String {
        let reg = |r: &Reg| match r {
            Reg::Not => "-".to_string(),
            Reg::Key(k) => format!("{k:x}"),
            Reg::Split(s) => format!("SPLIT({s})"),
        };
        let mut s = format!("N1 {} | N2 {}", reg(&self.n1), reg(&self.n2));
        match &self.res {
            None => s.push_str(" | no reservation"),
            Some((h, t, sc)) => {
                let who = match h {
                    Holder::Node(n) => format!("{} holds", n.name()),
                    Holder::AllRegistrants => "all registrants hold".into(),
                    Holder::Several(x) => format!("{x} hold"),
                };
                let _ = write!(s, " | {who} type {t}");
                if *sc != 0 {
                    let _ = write!(s, " scope {sc}");
                }
            }
        }
        if !self.strangers.is_empty() {
            let _ = write!(s, " | others: {}", self.strangers.join(", "));
        }
        s
    }
}

// ---- access probes ----------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IoStatus {
    Good,
    Conflict,
    Other(u8, Option<(u8, u8, u8)>),
}

impl IoStatus {
    fn text(self) -> String {
        match self {
            IoStatus::Good => "ok".into(),
            IoStatus::Conflict => "RC".into(),
            IoStatus::Other(s, sense) => status_text(s, sense),
        }
    }
}

/// A WRITE and a READ through one nexus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rw {
    write: IoStatus,
    read: IoStatus,
}

impl Rw {
    fn text(self) -> String {
        format!("w {} r {}", self.write.text(), self.read.text())
    }
}

#[derive(Clone, Debug)]
struct Access {
    /// Per node-1 nexus; None: offline, not probed.
    n1: Vec<(String, Option<Rw>)>,
    n2: Rw,
}

impl Access {
    fn text(&self) -> String {
        let mut parts: Vec<String> = self
            .n1
            .iter()
            .map(|(l, rw)| match rw {
                Some(rw) => format!("{l} {}", rw.text()),
                None => format!("{l} offline"),
            })
            .collect();
        parts.push(format!("n2 {}", self.n2.text()));
        parts.join("; ")
    }
}

fn io_status(r: &Reply) -> IoStatus {
    match r.status {
        GOOD => IoStatus::Good,
        CONFLICT => IoStatus::Conflict,
        s => IoStatus::Other(s, r.sense.map(|c| (c.key, c.asc, c.ascq))),
    }
}

fn probe_nexus(lu: &Lu, n: &Nexus) -> Result<Rw, String> {
    let lba = PROBE_LBA.to_be_bytes();
    let write = [0x2a, 0, lba[0], lba[1], lba[2], lba[3], 0, 0, 1, 0];
    let read = [0x28, 0, lba[0], lba[1], lba[2], lba[3], 0, 0, 1, 0];
    let block = vec![0x5a; lu.block_len];
    let w = past_ua(|| Ok(sg_cmd(&n.sg, &write, Io::Out(&block))))?;
    let r = past_ua(|| Ok(sg_cmd(&n.sg, &read, Io::In(lu.block_len))))?;
    Ok(Rw {
        write: io_status(&w),
        read: io_status(&r),
    })
}

fn probe(lu: &Lu, offline: &[String]) -> Result<Access, String> {
    let mut n1 = Vec::new();
    for n in &lu.node1 {
        let rw = if offline.contains(&n.label) {
            None
        } else {
            Some(probe_nexus(lu, n)?)
        };
        n1.push((n.label.clone(), rw));
    }
    Ok(Access {
        n1,
        n2: probe_nexus(lu, &lu.node2)?,
    })
}

/// The state after a PR OUT: per nexus, at the node level, and access.
#[derive(Clone, Debug)]
struct Snapshot {
    raw: Raw,
    view: View,
    access: Access,
}

fn snapshot(lu: &Lu, offline: &[String]) -> Result<Snapshot, String> {
    let raw = read_raw(lu, offline)?;
    let view = raw.view();
    Ok(Snapshot {
        access: probe(lu, offline)?,
        raw,
        view,
    })
}

// ---- runs ---------------------------------------------------------------------------------------

struct Record {
    ans: Ans,
    /// What a path action did (shown instead of the answer).
    note: Option<String>,
    /// How long the command took (past unit attentions included).
    took: Duration,
    /// After a PR OUT: the state; None after a PR IN (nothing changed).
    after: Option<Snapshot>,
}

/// A run's records, and why it stopped early if it did: the helper
/// closed the connection or did not answer (a SCSI answer, even an
/// error, is a record).
struct RunResult {
    records: Vec<Record>,
    stopped: Option<String>,
}

/// Run `seq` on `lu`: node 1 through the helper at `socket` (one
/// connection, the device opened once read-write, as QEMU keeps it), node
/// 2 with SG_IO.
fn run(lu: &Lu, socket: &Path, seq: &Sequence, offline: &[String]) -> RunResult {
    let mut records = Vec::new();
    let stopped = run_into(&mut records, lu, socket, seq, offline).err();
    RunResult { records, stopped }
}

fn run_into(
    out: &mut Vec<Record>,
    lu: &Lu,
    socket: &Path,
    seq: &Sequence,
    offline: &[String],
) -> TestResult {
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&lu.node1_dev)
        .map_err(|e| format!("opening {}: {e}", lu.node1_dev.display()))?;
    let mut c =
        Client::connect(socket).map_err(|e| format!("connecting to {}: {e}", socket.display()))?;
    c.stream()
        .set_read_timeout(Some(HELPER_TIMEOUT))
        .map_err(|e| e.to_string())?;
    // Paths this run took down, and every path offline now.
    let mut down: Vec<OfflinePath> = Vec::new();
    let mut offline: Vec<String> = offline.to_vec();
    for s in &seq.steps {
        let t = Instant::now();
        let (r, note) = match (s.cmd, s.by) {
            (Cmd::Path(a), _) => {
                let note = path_action(lu, a, &mut down, &mut offline)?;
                let done = Reply {
                    status: GOOD,
                    sense: None,
                    data: Vec::new(),
                };
                (done, Some(note))
            }
            (_, N1) => (helper_pr(&mut c, &dev, s.cmd)?, None),
            (_, N2) => (sg_pr(&lu.node2.sg, s.cmd)?, None),
        };
        let took = t.elapsed();
        let after = match s.cmd {
            Cmd::In { .. } => None,
            _ => Some(snapshot(lu, &offline)?),
        };
        out.push(Record {
            ans: answer(lu, s.by, s.cmd, &r),
            note,
            took,
            after,
        });
    }
    Ok(())
}

/// Take a path action on `lu`; what was done, for the table.
fn path_action(
    lu: &Lu,
    a: PathAction,
    down: &mut Vec<OfflinePath>,
    offline: &mut Vec<String>,
) -> Result<String, String> {
    if lu.node1.len() < 2 {
        return Ok("(one nexus: nothing to do)".into());
    }
    let block = match a {
        PathAction::Down(i) => lu.node1[i].block.clone().unwrap(),
        PathAction::HolderDown => {
            let raw = read_raw(lu, offline)?;
            let h = raw
                .n1_holder()
                .ok_or_else(|| format!("no path of the map holds a reservation: {}", raw.text()))?;
            h.to_string()
        }
        PathAction::AllUp => {
            let mut notes = Vec::new();
            for mut p in down.drain(..) {
                let r = reinstate(lu, &mut p)?;
                offline.retain(|b| *b != p.block);
                notes.push(match r.keyed {
                    Some(t) => format!(
                        "{} back, key {} after {}",
                        p.block,
                        key_text(r.got),
                        secs(t)
                    ),
                    None => format!(
                        "{} back with key {}, the map's {}",
                        p.block,
                        key_text(r.got),
                        key_text(r.want)
                    ),
                });
            }
            return Ok(notes.join("; "));
        }
    };
    let (p, took) = OfflinePath::take(&block)?;
    down.push(p);
    offline.push(block.clone());
    Ok(format!("{block} failed after {}", secs(took)))
}

/// Bring the LU back to nothing: node 2 registers and CLEARs; on the map,
/// multipathd forgets the map's key and registered flag (what reservd's
/// CLEANUP does); unit attentions are taken with TEST UNIT READY on every
/// nexus. Checked with READ FULL STATUS.
fn reset(lu: &Lu, offline: &[String]) -> TestResult {
    let n2 = &lu.node2.sg;
    let r = sg_pr(
        n2,
        Cmd::Out {
            sa: prout_sa::REGISTER_AND_IGNORE,
            ty: 0,
            key: 0,
            sa_key: RESET_KEY,
        },
    )?;
    if r.status != GOOD {
        return Err(format!(
            "reset of the {}: REGISTER AND IGNORE: {}",
            lu.what,
            r.text()
        ));
    }
    let r = sg_pr(
        n2,
        Cmd::Out {
            sa: prout_sa::CLEAR,
            ty: 0,
            key: RESET_KEY,
            sa_key: 0,
        },
    )?;
    if r.status != GOOD {
        return Err(format!("reset of the {}: CLEAR: {}", lu.what, r.text()));
    }
    if let Some(minor) = lu.dm_minor {
        let mut conn = reservd_daemon::backend::multipath::multipathd::Multipathd::from_env()
            .with_timeout(Duration::from_secs(20))
            .connect()
            .map_err(|e| format!("multipathd: {e}"))?;
        reservd_daemon::backend::multipath::multipathd::clear_map_keys(&mut conn, minor)
            .map_err(|e| format!("multipathd: {e}"))?;
        let key = conn
            .command(&format!("getprkey map dm-{minor}"))
            .map_err(|e| format!("multipathd: {e}"))?;
        if !key.starts_with("none") {
            return Err(format!("multipathd still has a key for the map: {key:?}"));
        }
    }
    for n in lu.nexuses().filter(|n| !offline.contains(&n.label)) {
        let r = past_ua(|| Ok(sg_cmd(&n.sg, &[0; 6], Io::None)))?;
        if r.status != GOOD {
            return Err(format!("TEST UNIT READY on {}: {}", n.label, r.text()));
        }
    }
    let raw = read_raw(lu, offline)?;
    if raw.res.is_some() || raw.nexuses.iter().any(|n| n.key.is_some()) || !raw.strangers.is_empty()
    {
        return Err(format!(
            "the {} is not empty after the reset: {}",
            lu.what,
            raw.text()
        ));
    }
    // Every path of the map usable again (see restore_capacity): the LU
    // holds no reservation now, so READ CAPACITY works.
    for n in lu.node1.iter().filter(|n| !offline.contains(&n.label)) {
        let Some(b) = n.block.as_deref() else {
            continue;
        };
        match restore_capacity(b)? {
            Capacity::Fine => {}
            Capacity::Restored => {
                println!("  ({b} had a capacity of 0, see restore_capacity: rescanned)")
            }
            Capacity::Zero => return Err(format!("{b}: capacity 0 even after a rescan")),
        }
    }
    Ok(())
}

// ---- multipathd and path states ---------------------------------------------------------------

fn multipathd(cmd: &str) -> Result<String, String> {
    reservd_daemon::backend::multipath::multipathd::Multipathd::from_env()
        .with_timeout(Duration::from_secs(20))
        .connect()
        .and_then(|mut c| c.command(cmd))
        .map_err(|e| format!("multipathd {cmd}: {e}"))
}

/// multipathd's "dm state, checker state" of a path, e.g. `active ready`.
fn mp_path_state(block: &str) -> Result<String, String> {
    let out = multipathd("show paths raw format \"%d %t %T\"")?;
    Ok(out
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix(&format!("{block} "))
                .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_default())
}

fn wait_path_state(block: &str, want: &str, limit: Duration) -> Result<Duration, String> {
    let t = Instant::now();
    loop {
        let st = mp_path_state(block)?;
        if st == want {
            return Ok(t.elapsed());
        }
        if t.elapsed() > limit {
            return Err(format!(
                "{block}: multipathd shows '{st}', not '{want}', after {limit:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Until multipathd has shown each of `blocks` `active ready` for longer
/// than one check interval (1 to 2 s in the bed) without a break.
fn steady(blocks: &[&str]) -> TestResult {
    let t = Instant::now();
    let mut since = Instant::now();
    loop {
        for b in blocks {
            if mp_path_state(b)? != "active ready" {
                since = Instant::now();
            }
        }
        if since.elapsed() > Duration::from_millis(2200) {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(30) {
            return Err(format!(
                "{blocks:?}: multipathd never showed them all active ready for 2.2 s in a row \
                 in 30 s"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn set_device_state(block: &str, state: &str) -> TestResult {
    let p = format!("/sys/block/{block}/device/state");
    std::fs::write(&p, format!("{state}\n")).map_err(|e| format!("{p}: {e}"))
}

/// A path of the map taken offline; brought back when dropped (if the
/// check did not already).
struct OfflinePath {
    block: String,
    back: bool,
}

impl OfflinePath {
    fn take(block: &str) -> Result<(OfflinePath, Duration), String> {
        set_device_state(block, "offline")?;
        let p = OfflinePath {
            block: block.to_string(),
            back: false,
        };
        let took = wait_path_state(block, "failed faulty", Duration::from_secs(20))?;
        Ok((p, took))
    }
}

impl Drop for OfflinePath {
    fn drop(&mut self) {
        if !self.back {
            let _ = set_device_state(&self.block, "running");
            let _ = wait_path_state(&self.block, "active ready", Duration::from_secs(20));
        }
    }
}

/// How a path came back.
struct Reinstated {
    /// Whether it came back with a capacity of 0 (see restore_capacity).
    capacity: Capacity,
    /// Until multipathd showed it `active ready`.
    active: Duration,
    /// The map's key: what the path that stayed online carries.
    want: Option<u64>,
    got: Option<u64>,
    /// Until the path carried `want` (None: it never did).
    keyed: Option<Duration>,
    after: Snapshot,
}

/// How long a reinstated path may take to carry the map's key again after
/// multipathd shows it active: a few check intervals (1 to 2 s here).
const REREGISTER_LIMIT: Duration = Duration::from_secs(10);
/// With no key on the map: how long the reinstated path is watched for a
/// registration that should not come (over one check interval).
const NO_KEY_WATCH: Duration = Duration::from_millis(2500);

/// What `restore_capacity` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Capacity {
    Fine,
    Restored,
    /// Still 0 after a rescan (READ CAPACITY refused, see below).
    Zero,
}

/// LIO refuses READ CAPACITY (RESERVATION CONFLICT) to a nexus that is not
/// registered while an exclusive-access reservation is held, where SBC
/// allows it under every type. A path that comes back while the map holds
/// such a reservation is revalidated by the kernel before multipathd has
/// registered it again, and keeps a capacity of 0: dm fails it on its first
/// I/O and multipathd reinstates it every second, and with the other path
/// offline every command on the map waits for a path. That is the test
/// bed's target, not what is tested: such a path is rescanned
/// (`device/rescan` reads the capacity again) once the LU allows it.
fn restore_capacity(block: &str) -> Result<Capacity, String> {
    let size = || {
        let p = format!("/sys/block/{block}/size");
        std::fs::read_to_string(&p)
            .map_err(|e| format!("{p}: {e}"))
            .map(|s| s.trim().parse::<u64>().unwrap_or(0))
    };
    if size()? != 0 {
        return Ok(Capacity::Fine);
    }
    let rescan = format!("/sys/block/{block}/device/rescan");
    std::fs::write(&rescan, "1\n").map_err(|e| format!("{rescan}: {e}"))?;
    let t = Instant::now();
    while size()? == 0 {
        if t.elapsed() > Duration::from_secs(2) {
            return Ok(Capacity::Zero);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Capacity::Restored)
}

fn reinstate(lu: &Lu, p: &mut OfflinePath) -> Result<Reinstated, String> {
    let t = Instant::now();
    set_device_state(&p.block, "running")?;
    p.back = true;
    wait_path_state(&p.block, "active ready", Duration::from_secs(20))?;
    let active = t.elapsed();
    let (want, got, keyed) = loop {
        let raw = read_raw(lu, &[])?;
        let want = raw
            .nexuses
            .iter()
            .find(|n| n.node == N1 && n.label != p.block)
            .and_then(|n| n.key);
        let got = raw
            .nexuses
            .iter()
            .find(|n| n.label == p.block)
            .and_then(|n| n.key);
        let since = t.elapsed() - active;
        match want {
            Some(_) if got == want => break (want, got, Some(t.elapsed())),
            Some(_) if since > REREGISTER_LIMIT => break (want, got, None),
            None if since > NO_KEY_WATCH => {
                break (want, got, (got.is_none()).then(|| t.elapsed()))
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    // Once it carries the key (if the map has one), READ CAPACITY works.
    let capacity = restore_capacity(&p.block)?;
    Ok(Reinstated {
        capacity,
        active,
        want,
        got,
        keyed,
        after: snapshot(lu, &[])?,
    })
}

// ---- comparison ---------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cell {
    NotApplicable,
    Same,
    Differs,
    /// Types 1 and 3 held by node 1: the map's path that did not reserve
    /// is not the holder nexus.
    Exception,
}

/// Node 1's access on every usable path of the map against the oracle's
/// single nexus, and node 2's against node 2's.
fn compare_access(o: &Snapshot, m: &Snapshot) -> Cell {
    let want = o.access.n1.first().and_then(|(_, rw)| *rw);
    let bad: Vec<&str> = m
        .access
        .n1
        .iter()
        .filter(|(_, rw)| rw.is_some() && *rw != want)
        .map(|(l, _)| l.as_str())
        .collect();
    let n2_same = m.access.n2 == o.access.n2;
    if bad.is_empty() && n2_same {
        return Cell::Same;
    }
    let n1_holds_1_or_3 = matches!(o.view.res, Some((Holder::Node(N1), 1 | 3, _)));
    match m.raw.n1_holder() {
        Some(h) if n2_same && n1_holds_1_or_3 && !bad.contains(&h) => Cell::Exception,
        _ => Cell::Differs,
    }
}

fn check_facts(step: &Step, rec: &Record) -> Result<(), String> {
    for f in step.spc4 {
        let view = rec.after.as_ref().map(|s| &s.view);
        let ok = match *f {
            Fact::Status(s) => rec.ans.status == s,
            Fact::Holds(n, t) => view.is_some_and(|v| v.res == Some((Holder::Node(n), t, 0))),
            Fact::AllRegistrants(t) => {
                view.is_some_and(|v| v.res == Some((Holder::AllRegistrants, t, 0)))
            }
            Fact::NoReservation => view.is_some_and(|v| v.res.is_none()),
            Fact::Key(n, k) => view.is_some_and(|v| {
                let r = if n == N1 { &v.n1 } else { &v.n2 };
                *r == k.map_or(Reg::Not, Reg::Key)
            }),
        };
        if !ok {
            return Err(format!(
                "{}: SPC-4 says {f:?}; the single-path LU answered {} with state {}",
                step.name,
                rec.ans.text(),
                view.map_or("-".into(), |v| v.text())
            ));
        }
    }
    Ok(())
}

struct Row {
    name: String,
    oracle: String,
    ours: String,
    answer: Cell,
    state: Cell,
    writes: Cell,
    baseline: Cell,
    /// The answers differ only in entries repeated once per path.
    per_path: bool,
    /// Side by side, for a row that differs.
    detail: Vec<(String, String, String)>,
}

impl Row {
    fn fails(&self) -> bool {
        [self.answer, self.state, self.writes].contains(&Cell::Differs)
    }

    fn exception(&self) -> bool {
        self.writes == Cell::Exception
    }
}

fn same(a: bool) -> Cell {
    if a {
        Cell::Same
    } else {
        Cell::Differs
    }
}

fn state_cells(o: Option<&Snapshot>, m: Option<&Snapshot>) -> (Cell, Cell) {
    match (o, m) {
        (Some(o), Some(m)) => (same(o.view == m.view), compare_access(o, m)),
        _ => (Cell::NotApplicable, Cell::NotApplicable),
    }
}

fn details(
    oa: &str,
    ma: &str,
    o: Option<&Snapshot>,
    m: Option<&Snapshot>,
) -> Vec<(String, String, String)> {
    let mut d = vec![("answer".into(), oa.to_string(), ma.to_string())];
    if let (Some(o), Some(m)) = (o, m) {
        d.push(("node level".into(), o.view.text(), m.view.text()));
        d.push(("per nexus".into(), o.raw.text(), m.raw.text()));
        d.push(("access".into(), o.access.text(), m.access.text()));
    }
    d
}

fn step_row(name: String, o: &Record, m: &Record, base: Option<&Record>) -> Row {
    let (state, writes) = state_cells(o.after.as_ref(), m.after.as_ref());
    let baseline = match base {
        None => Cell::NotApplicable,
        Some(b) => {
            let (s, w) = state_cells(o.after.as_ref(), b.after.as_ref());
            same(b.ans == o.ans && s != Cell::Differs && w != Cell::Differs)
        }
    };
    let text = |r: &Record| r.note.clone().unwrap_or_else(|| r.ans.text());
    let mut row = Row {
        name,
        oracle: text(o),
        ours: text(m),
        answer: same(o.ans == m.ans),
        state,
        writes,
        baseline,
        per_path: o.ans != m.ans && o.ans.node_level() == m.ans.node_level(),
        detail: Vec::new(),
    };
    if row.fails() {
        row.detail = details(&row.oracle, &row.ours, o.after.as_ref(), m.after.as_ref());
    }
    row
}

/// The rows of one run of `seq`: one per step that ran, and one for the
/// step at which the run stopped (the rest did not run).
fn sequence_rows(
    tag: &str,
    seq: &Sequence,
    oracle: &[Record],
    ours: &RunResult,
    base: Option<&RunResult>,
) -> Vec<Row> {
    let mut rows = Vec::new();
    for (k, s) in seq.steps.iter().enumerate() {
        let name = format!("{tag}/{}", s.name);
        let Some(m) = ours.records.get(k) else {
            if let Some(e) = &ours.stopped {
                let o = oracle[k].ans.text();
                rows.push(Row {
                    name,
                    oracle: o.clone(),
                    ours: "no answer: sequence stopped".into(),
                    answer: Cell::Differs,
                    state: Cell::NotApplicable,
                    writes: Cell::NotApplicable,
                    baseline: Cell::NotApplicable,
                    per_path: false,
                    detail: vec![("answer".into(), o, format!("no answer: {e}"))],
                });
            }
            break;
        };
        let b = base.and_then(|b| b.records.get(k));
        rows.push(step_row(name, &oracle[k], m, b));
    }
    rows
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn reinstated_row(
    name: String,
    oracle_last: Option<&Snapshot>,
    block: &str,
    r: &Reinstated,
) -> Row {
    let oracle = oracle_last.map_or("-".into(), |s| match &s.view.n1 {
        Reg::Key(k) => format!("N1 registered {k:x}"),
        Reg::Not => "N1 not registered".into(),
        Reg::Split(x) => format!("SPLIT({x})"),
    });
    let ours = match (r.want, r.keyed) {
        (Some(k), Some(t)) => format!(
            "{block} has {k:x} after {} (active after {})",
            secs(t),
            secs(r.active)
        ),
        (None, Some(t)) => format!("{block} has no key, none on the map ({} watched)", secs(t)),
        (w, None) => format!(
            "{block} has {} after {}, the map {} (active after {})",
            key_text(r.got),
            secs(
                r.active
                    + if w.is_some() {
                        REREGISTER_LIMIT
                    } else {
                        NO_KEY_WATCH
                    }
            ),
            key_text(w),
            secs(r.active)
        ),
    };
    let (state, writes) = state_cells(oracle_last, Some(&r.after));
    let mut row = Row {
        name,
        oracle,
        ours,
        answer: same(r.keyed.is_some()),
        state,
        writes,
        baseline: Cell::NotApplicable,
        per_path: false,
        detail: Vec::new(),
    };
    if row.fails() {
        row.detail = details(&row.oracle, &row.ours, oracle_last, Some(&r.after));
    }
    row
}

// ---- output -------------------------------------------------------------------------------------

fn cell_text(c: Cell) -> &'static str {
    match c {
        Cell::NotApplicable => "",
        Cell::Same => "=",
        Cell::Differs => "DIFFERS",
        Cell::Exception => "exception¹",
    }
}

fn baseline_text(c: Cell) -> &'static str {
    match c {
        Cell::NotApplicable => "-",
        Cell::Same => "same",
        Cell::Differs => "differs",
        Cell::Exception => "exception¹",
    }
}

fn print_table(title: &str, rows: &[Row]) {
    let header = [
        "",
        "step",
        "oracle answer",
        "reservd answer",
        "state",
        "writes",
        "qemu-pr-helper",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            let mark = if r.fails() {
                "FAIL"
            } else if r.exception() {
                "exc"
            } else {
                "ok"
            };
            let ours = if r.per_path {
                format!("{} ≠ per path", r.ours)
            } else if r.answer == Cell::Differs {
                format!("{} ≠", r.ours)
            } else {
                r.ours.clone()
            };
            [
                mark.to_string(),
                r.name.clone(),
                r.oracle.clone(),
                ours,
                cell_text(r.state).to_string(),
                cell_text(r.writes).to_string(),
                baseline_text(r.baseline).to_string(),
            ]
        })
        .collect();
    let mut w = header.map(|h| h.chars().count());
    for c in &cells {
        for (i, s) in c.iter().enumerate() {
            w[i] = w[i].max(s.chars().count());
        }
    }
    let line = |c: &[String]| {
        let mut s = String::new();
        for (i, x) in c.iter().enumerate() {
            let pad = w[i] - x.chars().count();
            let _ = write!(s, "{x}{} ", " ".repeat(pad));
            if i + 1 < c.len() {
                s.push_str("| ");
            }
        }
        println!("{}", s.trim_end());
    };
    println!("\n{title}");
    line(&header.map(String::from));
    line(&w.map(|n| "-".repeat(n)));
    for c in &cells {
        line(c);
    }
}

fn print_details(rows: &[Row]) {
    let failing: Vec<&Row> = rows.iter().filter(|r| r.fails()).collect();
    if failing.is_empty() {
        return;
    }
    println!("\nDifferences, side by side (oracle: single-path LU | reservd: the map):");
    for r in failing {
        println!("\n  {}", r.name);
        let lw = r
            .detail
            .iter()
            .map(|(_, o, _)| o.chars().count())
            .max()
            .unwrap_or(0)
            .max(6);
        for (what, o, m) in &r.detail {
            println!(
                "    {what:<11} {o}{} | {m}",
                " ".repeat(lw - o.chars().count())
            );
        }
    }
}

// ---- the scenario ---------------------------------------------------------------------------------

#[derive(Default)]
struct Times {
    resets: Duration,
    oracle: Duration,
    map: Duration,
    offline: Duration,
    baseline: Duration,
    down: Vec<Duration>,
    back: Vec<Duration>,
    /// Paths found with a capacity of 0, and what a rescan did.
    rescanned: Vec<String>,
}

fn timed<T>(acc: &mut Duration, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    *acc += t.elapsed();
    r
}

fn map_is_one_nexus() -> TestResult {
    let started = Instant::now();
    let release = std::env::var("RESERVD_VM_RELEASE").unwrap_or_else(|_| "bookworm".into());
    let mpath =
        std::env::var("RESERVD_MPATH_VERSION").unwrap_or_else(|_| "(version not given)".into());
    let map = Lu::map()?;
    let sp = Lu::single_path()?;
    for n in &map.node1 {
        let b = n.block.as_deref().unwrap();
        wait_path_state(b, "active ready", Duration::from_secs(20))?;
    }
    println!(
        "  {release}, multipath-tools {mpath}: map {} over {} (node 1), node 2 on {} ({}); \
         oracle: {} (node 1), node 2 on {} ({})",
        map.node1_dev.display(),
        map.node1
            .iter()
            .map(|n| n.label.as_str())
            .collect::<Vec<_>>()
            .join(" "),
        map.node2.block.as_deref().unwrap_or("?"),
        map.node2.initiator,
        sp.node1_dev.display(),
        var("RESERVD_N2_SP_DEV").unwrap_or_default(),
        sp.node2.initiator,
    );
    let start_reservd = || reservd("reservd-conformance", &[]);
    let mut d = start_reservd()?;
    let qemu_bin = Path::new("/usr/bin/qemu-pr-helper");
    let start_qemu = || helper(qemu_bin, "qemu-pr-helper-conformance", &[]);
    let mut qemu = if qemu_bin.exists() {
        Some(start_qemu()?)
    } else {
        println!("  /usr/bin/qemu-pr-helper is not in this root: no baseline column");
        None
    };
    let mut times = Times::default();
    let mut online = Vec::new();
    let mut offline_rows = Vec::new();
    let mut spc4 = Vec::new();
    // Commands through reservd that took longer than SLOW.
    let mut slow: Vec<(String, Duration)> = Vec::new();
    let mut note_slow = |tag: &str, seq: &Sequence, r: &RunResult| {
        for (s, rec) in seq.steps.iter().zip(&r.records) {
            if rec.note.is_none() && rec.took > SLOW {
                slow.push((format!("{tag}/{}", s.name), rec.took));
            }
        }
    };
    // RESERVD_CONFORMANCE_SEQUENCES=a,b runs only the sequences whose
    // names contain one of the words (to iterate on one finding).
    let only = std::env::var("RESERVD_CONFORMANCE_SEQUENCES").unwrap_or_default();
    let words: Vec<&str> = only.split(',').filter(|w| !w.is_empty()).collect();
    // (each keeps its place in the full list: which path goes offline)
    let seqs: Vec<(usize, Sequence)> = sequences()
        .into_iter()
        .enumerate()
        .filter(|(_, s)| words.is_empty() || words.iter().any(|w| s.name.contains(w)))
        .collect();
    if seqs.is_empty() {
        return Err(format!(
            "RESERVD_CONFORMANCE_SEQUENCES={only} selects no sequence"
        ));
    }
    if !words.is_empty() {
        println!(
            "  only the sequences {}",
            seqs.iter()
                .map(|(_, s)| s.name)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for (i, seq) in &seqs {
        // A path that came back in the previous sequence may still fail and
        // come back (a revalidation refused while it was unregistered): each
        // sequence starts with the map's paths steady.
        let blocks: Vec<&str> = map
            .node1
            .iter()
            .map(|n| n.block.as_deref().unwrap())
            .collect();
        steady(&blocks)?;
        timed(&mut times.resets, || reset(&sp, &[]))?;
        let t = Instant::now();
        let oracle = timed(&mut times.oracle, || run(&sp, &d.socket, seq, &[]));
        let t_oracle = t.elapsed();
        if let Some(e) = oracle.stopped {
            return Err(format!("{}: the oracle run stopped: {e}", seq.name));
        }
        let oracle = oracle.records;
        for (s, rec) in seq.steps.iter().zip(&oracle) {
            if let Err(e) = check_facts(s, rec) {
                spc4.push(format!("{}/{e}", seq.name));
            }
        }
        timed(&mut times.resets, || reset(&map, &[]))?;
        let t = Instant::now();
        let ours = timed(&mut times.map, || run(&map, &d.socket, seq, &[]));
        let t_map = t.elapsed();
        if let Some(e) = &ours.stopped {
            println!(
                "  {}: reservd stopped answering ({e}); starting it again",
                seq.name
            );
            d.stop();
            d = start_reservd()?;
        }
        let mut base = None;
        if let Some(q) = qemu.as_mut().filter(|_| !seq.moves_paths()) {
            timed(&mut times.resets, || reset(&map, &[]))?;
            let b = timed(&mut times.baseline, || run(&map, &q.socket, seq, &[]));
            if b.stopped.is_some() {
                q.stop();
                *q = start_qemu()?;
            }
            base = Some(b);
        }
        note_slow(seq.name, seq, &ours);
        online.extend(sequence_rows(seq.name, seq, &oracle, &ours, base.as_ref()));
        if seq.moves_paths() {
            println!(
                "  {:<33} oracle {:>5}, map {:>5} (paths fail and return in it)",
                seq.name,
                secs(t_oracle),
                secs(t_map)
            );
            continue;
        }

        // Once more with one path offline: path 2 for even sequences, path
        // 1 (the one libmpathpersist would use first) for odd ones.
        let block = map.node1[if i % 2 == 0 { 1 } else { 0 }]
            .block
            .clone()
            .unwrap();
        timed(&mut times.resets, || reset(&map, &[]))?;
        let t = Instant::now();
        let (mut down, took) = OfflinePath::take(&block)?;
        times.down.push(took);
        let t_run = Instant::now();
        let ours_off = run(&map, &d.socket, seq, std::slice::from_ref(&block));
        let run_off = t_run.elapsed();
        let back = reinstate(&map, &mut down);
        drop(down);
        times.offline += t.elapsed();
        if let Some(e) = &ours_off.stopped {
            println!(
                "  {}[{block} offline]: reservd stopped answering ({e}); starting it again",
                seq.name
            );
            d.stop();
            d = start_reservd()?;
        }
        let back = back?;
        times.back.push(back.keyed.unwrap_or(back.active));
        if back.capacity != Capacity::Fine {
            let what = format!("{block} after {}[{block} offline]", seq.name);
            times.rescanned.push(format!("{what}: {:?}", back.capacity));
        }
        println!(
            "  {:<33} oracle {:>5}, map {:>5}, {block} offline: down after {:>5}, run {:>5}, \
             back {:>5}",
            seq.name,
            secs(t_oracle),
            secs(t_map),
            secs(took),
            secs(run_off),
            secs(back.keyed.unwrap_or(back.active)),
        );
        let tag = format!("{}[{block} offline]", seq.name);
        note_slow(&tag, seq, &ours_off);
        offline_rows.extend(sequence_rows(&tag, seq, &oracle, &ours_off, None));
        let last = oracle.iter().rev().find_map(|r| r.after.as_ref());
        offline_rows.push(reinstated_row(
            format!("{tag}/reinstated_path_carries_the_maps_key"),
            last,
            &block,
            &back,
        ));
    }
    timed(&mut times.resets, || {
        reset(&map, &[]).and_then(|_| reset(&sp, &[]))
    })?;

    let title =
        format!("Persistent reservations on a multipath map: {release}, multipath-tools {mpath}");
    print_table(&format!("{title}; all paths usable"), &online);
    print_table(
        &format!("{title}; one path offline, then reinstated"),
        &offline_rows,
    );
    println!(
        "\n  oracle: node 1 = reservd on the single-path LU (one nexus), node 2 on a second nexus to it;\n  \
         state: READ FULL STATUS from node 2 at the node level; writes: WRITE and READ through every\n  \
         usable path of the map and node 2's, against the oracle's; `=` same, DIFFERS counted.\n  \
         ¹ types 1 and 3 held by node 1: only the path that reserved is the holder nexus (SPC-4), the\n  \
         other path gets RESERVATION CONFLICT whatever the helper does; not counted, as long as the\n  \
         holder path and node 2 match. Unit attentions are not compared (multipathd's checker takes\n  \
         them on the map's paths). PREEMPT AND ABORT is not run (it deadlocks LIO)."
    );
    let rows: Vec<&Row> = online.iter().chain(&offline_rows).collect();
    print_details(&online);
    print_details(&offline_rows);
    if !slow.is_empty() {
        println!("\nCommands through reservd that took over {}:", secs(SLOW));
        for (name, took) in &slow {
            println!("  {name}: {}", secs(*took));
        }
    }

    let count = |f: &dyn Fn(&Row) -> bool| rows.iter().filter(|r| f(r)).count();
    let failing = count(&|r| r.fails());
    let (answers, states, writes) = (
        count(&|r| r.answer == Cell::Differs),
        count(&|r| r.state == Cell::Differs),
        count(&|r| r.writes == Cell::Differs),
    );
    let exceptions = count(&|r| r.exception() && !r.fails());
    let reinstated: Vec<&&Row> = rows
        .iter()
        .filter(|r| r.name.ends_with("/reinstated_path_carries_the_maps_key"))
        .collect();
    let rekeyed = reinstated.iter().filter(|r| r.answer == Cell::Same).count();
    println!(
        "\nTimings: resets {}, oracle {}, map {}, map with a path offline {} (path down after {} to {}, \
         key back after {} to {}), qemu-pr-helper {}; group {}",
        secs(times.resets),
        secs(times.oracle),
        secs(times.map),
        secs(times.offline),
        secs(times.down.iter().min().copied().unwrap_or_default()),
        secs(times.down.iter().max().copied().unwrap_or_default()),
        secs(times.back.iter().min().copied().unwrap_or_default()),
        secs(times.back.iter().max().copied().unwrap_or_default()),
        secs(times.baseline),
        secs(started.elapsed()),
    );
    if !times.rescanned.is_empty() {
        println!(
            "Paths found with a capacity of 0 (LIO refused READ CAPACITY, see \
             restore_capacity): {}",
            times.rescanned.join(", ")
        );
    }
    if qemu.is_some() {
        let b = online
            .iter()
            .filter(|r| r.baseline == Cell::Differs)
            .count();
        println!(
            "qemu-pr-helper (plain SG_IO on the map), informational: differs from the oracle in {b} of {} rows",
            online.len()
        );
    }
    if !spc4.is_empty() {
        println!("\nThe single-path LU did not answer as SPC-4 says (the bed is not what this suite needs):");
        for e in &spc4 {
            println!("  {e}");
        }
    }
    let verdict = format!(
        "{} of {} rows differ from the oracle (answers {answers}, state {states}, writes {writes}); \
         {exceptions} row(s) are the types 1/3 exception; reinstated paths carrying the map's key: {rekeyed} of {}",
        failing,
        rows.len(),
        reinstated.len()
    );
    println!(
        "\nVerdict ({release}, multipath-tools {mpath}): {}: {verdict}",
        if failing == 0 && spc4.is_empty() {
            "PASS"
        } else {
            "FAIL"
        }
    );
    if !spc4.is_empty() {
        return Err(format!(
            "the oracle broke SPC-4 {} time(s); {verdict}",
            spc4.len()
        ));
    }
    if failing > 0 {
        return Err(format!("the map is not one nexus: {verdict}"));
    }
    Ok(())
}
