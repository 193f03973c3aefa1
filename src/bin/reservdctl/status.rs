//! `reservdctl status`: the reservation state of a multipath map as each of
//! its paths sees it, and `--repair`.
//!
//! Everything but the SCSI commands comes from sysfs and multipathd: the
//! map's name and WWID (`/sys/dev/block/M:N/dm/{name,uuid}`), its paths
//! (`slaves/`), each path's state (`device/state`), relative target port
//! (`device/vpd_pg83`) and, on Fibre Channel, initiator port
//! (`fc_host/hostN/port_name`). Each path gets PR IN READ KEYS, READ
//! RESERVATION and READ FULL STATUS directly with SG_IO (root only). The
//! verdict is [`reservd_client::pathcheck::verdict`].
//!
//! `--repair` registers a missing key with libmpathpersist on the map, in
//! this process: REGISTER AND IGNORE EXISTING KEY with the key as service
//! action key. libmpathpersist sends it on every usable path (the paths
//! that have the key register it again, which changes nothing), and with
//! `reservation_key file` tells multipathd, which then registers it on
//! paths that come back later. reservdctl runs as root for `status`
//! anyway, so it needs no running reservd for this.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, IsTerminal, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use reservd_client::pathcheck::{self, MapStatus, PathRead, PathState, Verdict};
use reservd_client::report;
use reservd_daemon::backend::dm::{DmControl, MapKind};
use reservd_daemon::backend::multipath::library::{Libmpathpersist, PersistLib};
use reservd_daemon::backend::multipath::multipathd::Multipathd;
use reservd_daemon::backend::sgio::{sg_io, Transfer};
use reservd_daemon::observe::audit::{multipath_style_wwid, read_sysfs};
use reservd_proto::cdb::{prin_sa, prout_sa, PrInCdb};
use reservd_proto::mpath_xlate::ProutRequest;
use reservd_proto::sense::Status;

/// Exit status of `status` when a usable path lacks a key.
pub const EXIT_INCONSISTENT: u8 = 5;

const SG_TIMEOUT_MS: u32 = 20_000;

/// The device's `/sys/class/block/NAME` directory and kernel name.
fn sys_block(dev: &Path) -> anyhow::Result<(PathBuf, String)> {
    let meta = std::fs::metadata(dev).with_context(|| format!("{}", dev.display()))?;
    if !meta.file_type().is_block_device() {
        bail!("{} is not a block device", dev.display());
    }
    let rdev = meta.rdev();
    let link = PathBuf::from(format!(
        "/sys/dev/block/{}:{}",
        libc::major(rdev),
        libc::minor(rdev)
    ));
    let real = std::fs::canonicalize(&link).with_context(|| format!("{}", link.display()))?;
    let name = real
        .file_name()
        .and_then(|n| n.to_str())
        .context("unexpected sysfs path")?
        .to_string();
    Ok((real, name))
}

fn is_mpath(sys: &Path) -> bool {
    read_sysfs(&sys.join("dm/uuid")).is_some_and(|u| u.starts_with("mpath-"))
}

/// One PR IN on `fd`, repeated while the path reports a unit attention.
fn prin(fd: BorrowedFd<'_>, sa: u8) -> Result<Vec<u8>, String> {
    let cdb = PrInCdb {
        service_action: sa,
        allocation_length: 8192,
    }
    .encode();
    for _ in 0..4 {
        let mut buf = vec![0u8; 8192];
        let (answer, transferred) = sg_io(fd, &cdb, Transfer::FromDevice(&mut buf), SG_TIMEOUT_MS);
        if answer.status == Status::GOOD {
            buf.truncate(transferred);
            return Ok(buf);
        }
        if answer.sense_code().is_some_and(|c| c.key == 0x06) {
            continue;
        }
        return Err(report::answer_text(&answer));
    }
    Err("unit attentions kept coming".into())
}

fn read_path(dev: &Path) -> Result<PathRead, String> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(dev)
        .map_err(|e| format!("opening {}: {e}", dev.display()))?;
    let fd = f.as_fd();
    Ok(PathRead {
        read_keys: prin(fd, prin_sa::READ_KEYS).map_err(|e| format!("READ KEYS: {e}"))?,
        read_reservation: prin(fd, prin_sa::READ_RESERVATION)
            .map_err(|e| format!("READ RESERVATION: {e}"))?,
        full_status: prin(fd, prin_sa::READ_FULL_STATUS)
            .map_err(|e| format!("READ FULL STATUS: {e}"))?,
    })
}

/// The SCSI host number of a disk (from its sysfs device path).
fn scsi_host(sys: &Path) -> Option<String> {
    let dev = std::fs::canonicalize(sys.join("device")).ok()?;
    dev.iter()
        .filter_map(|c| c.to_str())
        .find(|c| c.starts_with("host") && c[4..].chars().all(|d| d.is_ascii_digit()))
        .map(String::from)
}

fn path_state(name: &str, mpd_paths: &[(String, String)]) -> PathState {
    let sys = PathBuf::from("/sys/class/block").join(name);
    let initiator = scsi_host(&sys)
        .and_then(|h| read_sysfs(&Path::new("/sys/class/fc_host").join(h).join("port_name")))
        .and_then(|p| pathcheck::parse_port_name(&p));
    PathState {
        name: name.to_string(),
        devno: read_sysfs(&sys.join("dev")).unwrap_or_else(|| "?".into()),
        sysfs_state: read_sysfs(&sys.join("device/state")),
        multipathd: mpd_paths
            .iter()
            .find(|(d, _)| d == name)
            .map(|(_, s)| s.clone()),
        target_port: std::fs::read(sys.join("device/vpd_pg83"))
            .ok()
            .and_then(|p| pathcheck::vpd83_relative_target_port(&p)),
        initiator,
        read: read_path(&Path::new("/dev").join(name)),
    }
}

/// Gather everything about `device`.
pub fn gather(device: &Path) -> anyhow::Result<MapStatus> {
    let (mut sys, mut name) = sys_block(device)?;
    // A path of a multipath map stands for its map.
    if !is_mpath(&sys) {
        if let Ok(holders) = std::fs::read_dir(sys.join("holders")) {
            for h in holders.flatten() {
                let hs = std::fs::canonicalize(h.path()).unwrap_or(h.path());
                if is_mpath(&hs) {
                    eprintln!(
                        "reservdctl: {} is a path of multipath map {}; showing the map",
                        device.display(),
                        read_sysfs(&hs.join("dm/name")).unwrap_or_default()
                    );
                    name = h.file_name().to_string_lossy().into_owned();
                    sys = hs;
                    break;
                }
            }
        }
    }
    let mpd = Multipathd::from_env().with_timeout(Duration::from_secs(5));
    if is_mpath(&sys) {
        let map = read_sysfs(&sys.join("dm/name")).context("map without a dm name")?;
        let wwid = read_sysfs(&sys.join("dm/uuid")).map(|u| u["mpath-".len()..].to_string());
        let mut slaves: Vec<String> = std::fs::read_dir(sys.join("slaves"))
            .with_context(|| format!("{}/slaves", sys.display()))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        slaves.sort();
        let (reach, mpd_paths, key) = match mpd.connect() {
            Err(e) => (Err(format!("{}: {e}", mpd.describe())), Vec::new(), None),
            Ok(mut c) => {
                let paths = c
                    .command("show paths raw format \"%d %t %T %o\"")
                    .map(|r| pathcheck::parse_show_paths(&r))
                    .unwrap_or_default();
                let key = c
                    .command(&format!("getprkey map {map}"))
                    .map_err(|e| e.to_string())
                    .and_then(|r| pathcheck::parse_getprkey(&r));
                (Ok(()), paths, Some(key))
            }
        };
        Ok(MapStatus {
            device: device.display().to_string(),
            map: Some(map),
            kernel_name: name,
            wwid,
            paths: slaves.iter().map(|s| path_state(s, &mpd_paths)).collect(),
            multipathd: reach,
            multipathd_key: key,
        })
    } else {
        if read_sysfs(&sys.join("dm/uuid")).is_some() {
            bail!(
                "{} is a device-mapper device but not a multipath map",
                device.display()
            );
        }
        Ok(MapStatus {
            device: device.display().to_string(),
            map: None,
            // Written as in the audit records (3… for naa.…).
            wwid: read_sysfs(&sys.join("device/wwid")).map(|w| multipath_style_wwid(&w)),
            paths: vec![path_state(&name, &[])],
            kernel_name: name,
            multipathd: Err("not used for a plain disk".into()),
            multipathd_key: None,
        })
    }
}

fn render(s: &MapStatus, v: &Verdict, json: bool) {
    if json {
        println!("{}", pathcheck::json(s, v));
    } else {
        print!("{}", pathcheck::text(s, v));
    }
}

fn exit_for(v: &Verdict) -> u8 {
    if v.consistent() {
        0
    } else {
        EXIT_INCONSISTENT
    }
}

/// `reservdctl status DEVICE [--repair [--yes]]`: the exit status.
pub fn run(device: &Path, repair: bool, yes: bool, json: bool) -> anyhow::Result<u8> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!(
            "status needs root: it opens each path device and sends PERSISTENT RESERVE IN \
             on it with SG_IO"
        );
    }
    let s = gather(device)?;
    let v = pathcheck::verdict(&s);
    if repair && json {
        return repair_as_json(device, &s, &v, yes);
    }
    if !repair || v.missing.is_empty() {
        render(&s, &v, json);
        if repair {
            println!("Nothing to repair.");
        }
        return Ok(exit_for(&v));
    }
    render(&s, &v, false);
    let plan = plan(&s, &v)?;
    println!(
        "Repair: REGISTER AND IGNORE EXISTING KEY with service action key 0x{:x}{} on {} \
         through libmpathpersist: registers it on path(s) {} (paths that have it register it \
         again), and updates multipathd.",
        plan.key,
        if plan.aptpl { ", APTPL" } else { "" },
        plan.map_dev,
        plan.paths.join(", ")
    );
    if !yes {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            bail!("not repairing: stdin is not a terminal; add --yes to repair without asking");
        }
        print!("Proceed? [y/N] ");
        std::io::stdout().flush()?;
        let mut answer = String::new();
        stdin.lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            println!("Not repaired.");
            return Ok(EXIT_INCONSISTENT);
        }
    }
    let (s, v) = repair_and_look_again(device, &plan)?;
    println!("After the repair:");
    render(&s, &v, false);
    Ok(exit_for(&v))
}

/// `--repair --json`: no question can be asked, so `--yes` is needed when
/// there is something to repair; one JSON document (before, repair, after).
fn repair_as_json(
    device: &Path,
    s: &MapStatus,
    v: &pathcheck::Verdict,
    yes: bool,
) -> anyhow::Result<u8> {
    let before = pathcheck::json(s, v);
    if v.missing.is_empty() {
        println!("{}", pathcheck::repair_json(&before, None, None));
        return Ok(exit_for(v));
    }
    let plan = plan(s, v)?;
    if !yes {
        bail!("not repairing: --repair --json asks no question; add --yes to repair");
    }
    let (s, v) = repair_and_look_again(device, &plan)?;
    let after = pathcheck::json(&s, &v);
    println!(
        "{}",
        pathcheck::repair_json(&before, Some(&plan), Some(&after))
    );
    Ok(exit_for(&v))
}

/// Carry out `plan`, then look at `device` again.
fn repair_and_look_again(
    device: &Path,
    plan: &pathcheck::RepairPlan,
) -> anyhow::Result<(MapStatus, pathcheck::Verdict)> {
    register(Path::new(&plan.map_dev), plan.key, plan.aptpl)?;
    let s = gather(device)?;
    let v = pathcheck::verdict(&s);
    Ok((s, v))
}

/// The repair for the key some paths lack: one key, on a multipath map.
fn plan(s: &MapStatus, v: &pathcheck::Verdict) -> anyhow::Result<pathcheck::RepairPlan> {
    let map = s
        .map
        .clone()
        .context("only a multipath map can lack a key on a path")?;
    let map_dev = PathBuf::from("/dev/mapper").join(&map);
    let mut keys: Vec<u64> = v.missing.iter().map(|m| m.key).collect();
    keys.dedup();
    if keys.len() > 1 {
        bail!(
            "paths lack several keys ({}): a map has one key per host; re-register by hand \
             the one this host uses",
            keys.iter()
                .map(|k| format!("0x{k:x}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let key = keys[0];
    Ok(pathcheck::RepairPlan {
        map_dev: map_dev.display().to_string(),
        key,
        aptpl: aptpl_of(&map),
        paths: v.lacking(key).iter().map(|p| p.to_string()).collect(),
    })
}

/// Whether multipathd registers the map's key with APTPL.
fn aptpl_of(map: &str) -> bool {
    Multipathd::from_env()
        .with_timeout(Duration::from_secs(5))
        .connect()
        .and_then(|mut c| c.command(&format!("getprkey map {map}")))
        .is_ok_and(|r| r.trim().ends_with(":aptpl"))
}

/// REGISTER AND IGNORE EXISTING KEY with service action key `key` on the
/// map, through libmpathpersist.
fn register(map_dev: &Path, key: u64, aptpl: bool) -> anyhow::Result<()> {
    let f: File = OpenOptions::new()
        .read(true)
        .write(true)
        .open(map_dev)
        .with_context(|| format!("opening {}", map_dev.display()))?;
    // libmultipath exits the process when device-mapper is unusable: make
    // sure it is, and that this is a multipath map, first.
    let dm = DmControl::open().map_err(|e| anyhow::anyhow!("{e}"))?;
    if !matches!(dm.probe(f.as_fd()), MapKind::Multipath { .. }) {
        bail!("{} is not a multipath map", map_dev.display());
    }
    let lib = Libmpathpersist::load(mpath_sys_default(), 1)
        .map_err(|e| anyhow::anyhow!("libmpathpersist: {e}"))?;
    let mut req = ProutRequest::unregister();
    req.service_action = prout_sa::REGISTER_AND_IGNORE;
    req.header[8..16].copy_from_slice(&key.to_be_bytes());
    if aptpl {
        req.header[20] |= 0x01;
    }
    let code = lib.reserve_out(f.as_fd(), &req);
    if code != 0 {
        bail!(
            "libmpathpersist answered {code} ({})",
            mpath_code_text(code)
        );
    }
    Ok(())
}

fn mpath_sys_default() -> &'static str {
    mpath_sys::DEFAULT_LIBRARY
}

fn mpath_code_text(code: i32) -> &'static str {
    use reservd_proto::mpath;
    match code {
        mpath::SYNTAX_ERROR => "refused: the key differs from multipath.conf's reservation_key",
        mpath::RESERV_CONFLICT => "reservation conflict",
        mpath::FILE_ERROR => "a path device could not be opened",
        mpath::DMMP_ERROR => "no usable path, or multipathd refused the key",
        _ => "see libmpathpersist's MPATH_PR_* codes",
    }
}
