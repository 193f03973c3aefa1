//! `reservdctl check`: is this host set up for reservd? Each problem is
//! one line naming the fix; the exit status is 0 when everything is in
//! order, [`EXIT_PROBLEMS`] otherwise.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use reservd_daemon::backend::dm::DmControl;
use reservd_daemon::backend::multipath::library::Libmpathpersist;
use reservd_daemon::backend::multipath::multipathd::Multipathd;
use reservd_daemon::sandbox::privs;
use reservd_proto::{mpconf, wire};
use serde::Serialize;

/// Exit status when a check found a problem.
pub const EXIT_PROBLEMS: u8 = 5;

/// What every check found; `--json` prints it as it is.
#[derive(Default, Serialize)]
struct Findings {
    ok: Vec<String>,
    problems: Vec<Problem>,
}

/// One problem and its fix.
#[derive(Serialize)]
struct Problem {
    problem: String,
    fix: String,
}

impl Findings {
    fn ok(&mut self, s: impl Into<String>) {
        self.ok.push(s.into());
    }

    fn problem(&mut self, what: impl Into<String>, fix: impl Into<String>) {
        self.problems.push(Problem {
            problem: what.into(),
            fix: fix.into(),
        });
    }
}

fn cap_name(c: u32) -> &'static str {
    match c {
        privs::CAP_SYS_RAWIO => "CAP_SYS_RAWIO",
        privs::CAP_SYS_ADMIN => "CAP_SYS_ADMIN",
        _ => "?",
    }
}

/// The server's feature word after a successful handshake.
fn handshake(socket: &Path) -> std::io::Result<u32> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut f = [0u8; 4];
    s.read_exact(&mut f)?;
    s.write_all(&0u32.to_be_bytes())?;
    Ok(u32::from_be_bytes(f))
}

fn features_text(f: u32) -> String {
    let mut names = Vec::new();
    if f & wire::FEATURE_CLEANUP != 0 {
        names.push("CLEANUP");
    }
    if f & !wire::FEATURE_CLEANUP != 0 {
        names.push("unknown bits");
    }
    if names.is_empty() {
        format!("{f:#010x} (none)")
    } else {
        format!("{f:#010x} ({})", names.join(", "))
    }
}

pub fn run(socket: &Path, json: bool) -> u8 {
    let mut f = Findings::default();
    let root = nix::unistd::Uid::effective().is_root();

    // Device-mapper first: libmultipath must not be loaded without it.
    let dm_ok = match DmControl::open() {
        Ok(_) => {
            f.ok("/dev/mapper/control usable");
            true
        }
        Err(e) => {
            f.problem(
                format!("device-mapper unusable: {e}"),
                if root {
                    "load the dm_multipath module (modprobe dm_multipath) and start \
                     multipathd; without it multipath maps use SG_IO on one path"
                } else {
                    "run reservdctl check (and reservd) as root"
                },
            );
            false
        }
    };

    let mut version = None;
    if dm_ok {
        match Libmpathpersist::load(mpath_sys::DEFAULT_LIBRARY, 0) {
            Ok(lib) => {
                version = lib.version();
                f.ok(format!(
                    "libmpathpersist loadable ({}), multipath-tools {}",
                    lib.path().unwrap_or(mpath_sys::DEFAULT_LIBRARY),
                    lib.version_string()
                ));
                let fixes = reservd_proto::onenexus::Fixes::for_version(version);
                let applied = fixes.describe();
                if applied.is_empty() {
                    f.ok(format!(
                        "multipath-tools {}: its libmpathpersist keeps a map one I_T nexus for \
                         RELEASE and PREEMPT; reservd adds its key checks and one-path answers",
                        lib.version_string()
                    ));
                } else {
                    f.ok(format!(
                        "multipath-tools {}: reservd keeps each map one I_T nexus where this \
                         libmpathpersist would not: {}",
                        lib.version_string(),
                        applied.join("; ")
                    ));
                }
                if version.is_none() {
                    f.problem(
                        "multipath-tools' version is unknown (older than 0.8.6?)",
                        "use multipath-tools 0.8.6 or later (0.9.x needs 'reservation_key \
                         file' in defaults; 0.10 and later refuse PR OUT without a key)",
                    );
                }
            }
            Err(e) => f.problem(
                format!("libmpathpersist cannot be loaded: {e}"),
                "install multipath-tools (Debian/Ubuntu) or device-mapper-multipath \
                 (Fedora/RHEL)",
            ),
        }
    }

    let mpd = Multipathd::from_env().with_timeout(Duration::from_secs(5));
    match mpd.connect().and_then(|mut c| c.command("show daemon")) {
        Ok(r) => f.ok(format!("multipathd reachable: {}", r.trim())),
        Err(e) => f.problem(
            format!("multipathd not reachable ({e})"),
            "start it: systemctl enable --now multipathd (keys are not registered on new \
             or reinstated paths without it, and with 'reservation_key file' every \
             registration fails)",
        ),
    }

    let cfg = reservd_daemon::backend::multipath::read_key_config();
    let warnings = mpconf::diagnose(&cfg, version);
    if warnings.is_empty() {
        f.ok(format!(
            "reservation_key {} configured",
            cfg.defaults
                .as_deref()
                .or(cfg.per_map.first().map(String::as_str))
                .unwrap_or("?")
        ));
    }
    for w in warnings {
        let (what, fix) = match w.split_once(": ") {
            Some((a, b)) => (a.to_string(), b.to_string()),
            None => (w.clone(), "see multipath.conf(5), reservation_key".into()),
        };
        f.problem(what, fix);
    }

    // Privileges: what a reservd started the same way would keep.
    if !root {
        f.problem(
            "not running as root: reservd needs root to open path devices and update \
             multipathd's keys",
            "run reservd (and this check) as root",
        );
    }
    let wanted: &[u32] = if dm_ok {
        &[privs::CAP_SYS_RAWIO, privs::CAP_SYS_ADMIN]
    } else {
        &[privs::CAP_SYS_RAWIO]
    };
    match privs::capget() {
        Ok(caps) => {
            let missing: Vec<&str> = wanted
                .iter()
                .filter(|&&c| caps.permitted & (1u64 << c) == 0)
                .map(|&c| cap_name(c))
                .collect();
            if missing.is_empty() {
                f.ok(format!(
                    "capabilities reservd keeps are available: {}",
                    wanted
                        .iter()
                        .map(|&c| cap_name(c))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            } else {
                f.problem(
                    format!("{} not permitted", missing.join(" and ")),
                    "grant them (systemd: CapabilityBoundingSet/AmbientCapabilities; \
                     containers: --cap-add SYS_RAWIO --cap-add SYS_ADMIN)",
                );
            }
        }
        Err(e) => f.problem(format!("capget failed: {e}"), "check the kernel"),
    }

    match handshake(socket) {
        Ok(feat) => f.ok(format!(
            "reservd socket {}: handshake ok, features {}",
            socket.display(),
            features_text(feat)
        )),
        Err(e) => f.problem(
            format!("reservd socket {} unusable: {e}", socket.display()),
            "start reservd (systemctl start reservd.socket) or name its socket with -k",
        ),
    }

    if json {
        println!(
            "{}",
            serde_json::to_string(&f).expect("the findings serialize")
        );
    } else {
        for s in &f.ok {
            println!("ok: {s}");
        }
        for p in &f.problems {
            println!("PROBLEM: {}; fix: {}", p.problem, p.fix);
        }
        if f.problems.is_empty() {
            println!("All good.");
        }
    }
    if f.problems.is_empty() {
        0
    } else {
        EXIT_PROBLEMS
    }
}
