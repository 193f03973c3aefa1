//! What the multipath side counts for reservd's metrics (rendered by
//! `observe::metrics`): libmpathpersist's return codes per call, the route
//! each PR OUT on a map took ([`reservd_proto::onenexus::Route`]), and
//! each map's last registration count.
//!
//! The registration count is taken after each PR OUT on a map, when
//! [`super::Multipath::registration_checks`] is on (reservd turns it on
//! with its metrics): the key multipath-tools holds for the map
//! (multipathd's `getprkey`), READ KEYS on the map (one PR IN down one
//! path) and the map's active paths (device-mapper's table, no SCSI
//! command). READ KEYS lists one registration per registered I_T nexus,
//! and each path of the map is one: a map whose key is registered fewer
//! times than it has active paths has a path without the key. It counts,
//! it does not name the path (`reservdctl status` does, with READ FULL
//! STATUS on every path), and a registration of the same key by another
//! host would be counted as the map's. No command is added to PR IN.

use std::collections::BTreeMap;
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use super::{good, prin_cdb, Multipath, Via};
use reservd_proto::cdb::prin_sa;
use reservd_proto::mpath;
use reservd_proto::onenexus::Route;
use reservd_proto::prin;

/// A libmpathpersist call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// `mpath_persistent_reserve_in`.
    ReserveIn,
    /// `mpath_persistent_reserve_out`.
    ReserveOut,
}

impl Call {
    pub const ALL: [Call; 2] = [Call::ReserveIn, Call::ReserveOut];

    pub fn name(self) -> &'static str {
        match self {
            Call::ReserveIn => "reserve_in",
            Call::ReserveOut => "reserve_out",
        }
    }
}

/// One counter per known return code, and one for the others.
const CODE_SLOTS: usize = 20;

fn code_slot(code: i32) -> usize {
    if mpath::CODES.contains(&code) {
        (code - mpath::CODES.start()) as usize
    } else {
        CODE_SLOTS - 1
    }
}

/// The result name of a slot: the code's name, `UNKNOWN` for the last.
fn slot_name(slot: usize) -> &'static str {
    mpath::name(mpath::CODES.start() + slot as i32)
}

/// The multipath side's counters and the maps' last registration counts.
#[derive(Default)]
pub struct MultipathStats {
    library: [[AtomicU64; CODE_SLOTS]; 2],
    routes: [AtomicU64; Route::NAMES.len()],
    maps: Mutex<BTreeMap<u32, MapCheck>>,
}

/// What the last check of a map found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapCheck {
    /// The map's device-mapper name (`dm-N` when unknown).
    pub name: String,
    pub wwid: Option<String>,
    /// When it was checked.
    pub at: SystemTime,
    /// How long the check took (the PR OUT it follows waited for it).
    pub took: Duration,
    /// The counts, or why they could not be taken.
    pub outcome: Result<MapCount, String>,
}

/// A map's registrations as counted after a PR OUT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapCount {
    /// The paths device-mapper uses.
    pub active_paths: usize,
    /// Whether multipath-tools holds a key for the map.
    pub registered: bool,
    /// How many registrations with that key READ KEYS lists.
    pub key_registrations: usize,
}

impl MapCount {
    /// Active paths without the map's key (0 when it has none).
    pub fn paths_lacking_key(&self) -> usize {
        if self.registered {
            self.active_paths.saturating_sub(self.key_registrations)
        } else {
            0
        }
    }
}

impl MultipathStats {
    /// A libmpathpersist call returned `code`.
    pub fn library(&self, call: Call, code: i32) {
        self.library[call as usize][code_slot(code)].fetch_add(1, Relaxed);
    }

    /// The calls made, by call and result, those that happened.
    pub fn library_counts(&self) -> Vec<(Call, &'static str, u64)> {
        let mut out = Vec::new();
        for call in Call::ALL {
            for (slot, n) in self.library[call as usize].iter().enumerate() {
                let n = n.load(Relaxed);
                if n > 0 {
                    out.push((call, slot_name(slot), n));
                }
            }
        }
        out
    }

    /// A PR OUT on a map took `route`.
    pub fn route(&self, route: &Route) {
        self.routes[route.index()].fetch_add(1, Relaxed);
    }

    /// The routes taken, every route with its count.
    pub fn route_counts(&self) -> Vec<(&'static str, u64)> {
        Route::NAMES
            .iter()
            .zip(&self.routes)
            .map(|(name, n)| (*name, n.load(Relaxed)))
            .collect()
    }

    /// Keep `check` as map `dm-<minor>`'s last.
    pub fn record(&self, minor: u32, check: MapCheck) {
        self.maps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(minor, check);
    }

    /// Each map's last check, by minor number.
    pub fn maps(&self) -> Vec<MapCheck> {
        self.maps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// A sysfs attribute's value, trimmed; None when missing or empty.
fn sysfs(path: &Path) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// The name and WWID of the map behind `map` (sysfs, no device command).
fn map_names(map: BorrowedFd<'_>, minor: u32) -> (String, Option<String>) {
    let fallback = (format!("dm-{minor}"), None);
    let Ok(st) = nix::sys::stat::fstat(map) else {
        return fallback;
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFBLK {
        return fallback;
    }
    let base = format!(
        "/sys/dev/block/{}:{}/dm",
        libc::major(st.st_rdev),
        libc::minor(st.st_rdev)
    );
    let base = Path::new(&base);
    let name = sysfs(&base.join("name")).unwrap_or(fallback.0);
    let wwid = sysfs(&base.join("uuid")).and_then(|u| u.strip_prefix("mpath-").map(String::from));
    (name, wwid)
}

/// Count the registrations of the map's key after a PR OUT on it, and
/// keep the result in `m.stats` (the module's documentation says how).
pub(super) fn check_registrations(m: &Multipath, map: BorrowedFd<'_>, minor: u32) {
    let started = Instant::now();
    let outcome = (|| -> Result<MapCount, String> {
        let key = m.devices.map_key(minor)?.filter(|&k| k != 0);
        let active_paths = m
            .devices
            .active_paths(map)
            .map_err(|e| format!("the map's paths: {e}"))?
            .len();
        let a = m.run(Via::Map(map), &prin_cdb(prin_sa::READ_KEYS), &[]);
        if !good(&a) {
            return Err(format!("READ KEYS on the map: status {:#04x}", a.status.0));
        }
        let keys = prin::parse_read_keys(&a.data)
            .map_err(|_| "READ KEYS on the map: short data".to_string())?
            .1;
        Ok(MapCount {
            active_paths,
            registered: key.is_some(),
            key_registrations: key.map_or(0, |k| keys.iter().filter(|&&x| x == k).count()),
        })
    })();
    match &outcome {
        Ok(c) if c.paths_lacking_key() > 0 => log::warn!(
            "dm-{minor}: the map's key is registered {} time(s) for {} active path(s): a path \
             lacks it (reservdctl status names it)",
            c.key_registrations,
            c.active_paths
        ),
        Ok(_) => {}
        Err(e) => log::debug!("dm-{minor}: cannot count the map's registrations: {e}"),
    }
    let took = started.elapsed();
    let (name, wwid) = map_names(map, minor);
    m.stats.record(
        minor,
        MapCheck {
            name,
            wwid,
            at: SystemTime::now(),
            took,
            outcome,
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_codes_are_counted_by_name_and_unknown_ones_together() {
        let s = MultipathStats::default();
        s.library(Call::ReserveOut, mpath::SUCCESS);
        s.library(Call::ReserveOut, mpath::SUCCESS);
        s.library(Call::ReserveIn, mpath::DMMP_ERROR);
        s.library(Call::ReserveIn, mpath::SKIP);
        s.library(Call::ReserveIn, -22);
        s.library(Call::ReserveIn, 99);
        assert_eq!(
            s.library_counts(),
            vec![
                (Call::ReserveIn, "SKIP", 1),
                (Call::ReserveIn, "DMMP_ERROR", 1),
                (Call::ReserveIn, "UNKNOWN", 2),
                (Call::ReserveOut, "SUCCESS", 2),
            ]
        );
    }

    #[test]
    fn routes_are_counted_by_name() {
        let s = MultipathStats::default();
        s.route(&Route::Library);
        s.route(&Route::Library);
        s.route(&Route::ChangeKeyHolding { old: 3 });
        let counts = s.route_counts();
        assert_eq!(counts.len(), 8);
        assert!(counts.contains(&("library", 2)));
        assert!(counts.contains(&("change_key_holding", 1)));
        assert!(counts.contains(&("answer", 0)));
    }

    #[test]
    fn paths_lacking_the_key() {
        let c = |active_paths, registered, key_registrations| {
            MapCount {
                active_paths,
                registered,
                key_registrations,
            }
            .paths_lacking_key()
        };
        assert_eq!(c(2, true, 2), 0);
        assert_eq!(c(2, true, 1), 1);
        assert_eq!(c(2, true, 0), 2);
        // A failed path's registration stays on the LU: more than active.
        assert_eq!(c(1, true, 2), 0);
        // No key: nothing can be lacking.
        assert_eq!(c(2, false, 0), 0);
    }
}
