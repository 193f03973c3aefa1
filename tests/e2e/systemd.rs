//! The packaged reservd under systemd as PID 1 (`run-vm.sh --systemd`, the
//! `systemd` group): the .deb built by packaging/build-deb.sh is installed
//! with dpkg into the guest's root overlay, and its units are driven the
//! way an operator and QEMU drive them. Everything is read back from
//! systemd (`systemctl show`, the journal) and from the running process
//! (`/proc/PID/status`, `/proc/PID/mountinfo`).
//!
//! The scenarios run in order and share the installed package; the last
//! one installs QEMU's own socket units next to reservd's.

use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use reservd_client::client::Client;
use reservd_proto::cdb::{prin_sa, prout_sa};

use reservd_testkit::spawn::wait_for;

use crate::guest::{
    device_keys, env, expect_good, keys, mp_paths, past_ua, pr_in, pr_out, reset_lun, Scenario,
    TestResult,
};

/// Where reservd.socket listens (QEMU's helper's traditional path).
const SOCKET: &str = "/run/qemu-pr-helper.sock";
const SERVICE: &str = "reservd.service";
const SOCKET_UNIT: &str = "reservd.socket";
/// The drop-in of the watchdog scenario.
const WATCHDOG_DROPIN: &str = "/etc/systemd/system/reservd.service.d/50-watchdog-test.conf";

pub fn scenarios() -> Vec<Scenario> {
    vec![
        (
            "systemd_package_installs_and_listens",
            systemd_package_installs_and_listens,
        ),
        (
            "systemd_socket_activation_and_notify_readiness",
            systemd_socket_activation_and_notify_readiness,
        ),
        (
            "systemd_hardening_in_force_in_the_running_process",
            systemd_hardening_in_force_in_the_running_process,
        ),
        (
            "systemd_audit_records_in_the_journal",
            systemd_audit_records_in_the_journal,
        ),
        (
            "systemd_stop_drains_a_command_in_flight",
            systemd_stop_drains_a_command_in_flight,
        ),
        (
            "systemd_kill9_socket_stays_next_connection_starts_it_again",
            systemd_kill9_socket_stays_next_connection_starts_it_again,
        ),
        (
            "systemd_watchdog_restarts_a_wedged_event_loop",
            systemd_watchdog_restarts_a_wedged_event_loop,
        ),
        (
            "systemd_conflicts_with_qemus_own_socket_units",
            systemd_conflicts_with_qemus_own_socket_units,
        ),
    ]
}

// ---- systemd helpers ----------------------------------------------------------

fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .env("SYSTEMD_PAGER", "")
        .output()
        .map_err(|e| format!("running {cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {args:?}: {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn systemctl(args: &[&str]) -> Result<String, String> {
    run("systemctl", args)
}

/// One property of a unit (`systemctl show -p NAME --value`).
fn prop(unit: &str, name: &str) -> Result<String, String> {
    Ok(systemctl(&["show", "-p", name, "--value", unit])?
        .trim()
        .to_string())
}

fn active_state(unit: &str) -> Result<String, String> {
    prop(unit, "ActiveState")
}

fn main_pid(unit: &str) -> Result<u32, String> {
    prop(unit, "MainPID")?
        .parse()
        .map_err(|e| format!("MainPID of {unit}: {e}"))
}

fn wait_state(unit: &str, want: &str, secs: u64) -> TestResult {
    let mut last = String::new();
    let r = wait_for(
        Duration::from_secs(secs),
        &format!("{unit} is not {want}"),
        || {
            last = active_state(unit)?;
            Ok(last == want)
        },
    );
    r.map_err(|e| format!("{e} (it is {last})"))
}

/// A client of the socket, with a bound on every read (QEMU's helper
/// connection is blocking too; a hang must fail the test, not the VM).
fn connect(timeout: Duration) -> Result<Client, String> {
    let s = UnixStream::connect(SOCKET).map_err(|e| format!("connect {SOCKET}: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    Client::handshake(s, 0).map_err(|e| format!("handshake on {SOCKET}: {e}"))
}

fn sp_dev() -> PathBuf {
    PathBuf::from(env("RESERVD_SP_DEV"))
}

fn mp_dev() -> PathBuf {
    PathBuf::from(env("RESERVD_MP_DEV"))
}

fn read_keys_good(c: &mut Client, dev: &Path) -> TestResult {
    expect_good(
        &past_ua(|| pr_in(c, dev, prin_sa::READ_KEYS, 8192))?,
        &format!("READ KEYS on {}", dev.display()),
    )
}

fn exe_of(pid: u32) -> Result<PathBuf, String> {
    std::fs::read_link(format!("/proc/{pid}/exe")).map_err(|e| format!("/proc/{pid}/exe: {e}"))
}

/// The journal of a unit since boot, one line per entry.
fn journal(args: &[&str]) -> Result<String, String> {
    let mut a = vec!["-b", "--no-pager", "-q"];
    a.extend_from_slice(args);
    run("journalctl", &a)
}

// ---- scenarios ------------------------------------------------------------------

/// dpkg installs the package into the running system: the postinst
/// enables and starts the socket; the service waits for a client.
fn systemd_package_installs_and_listens() -> TestResult {
    check!(
        Path::new("/run/systemd/system").is_dir()
            && std::fs::read_to_string("/proc/1/comm").is_ok_and(|c| c.trim() == "systemd"),
        "PID 1 is not systemd: run this group with run-vm.sh --systemd"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let deb = std::fs::read_dir(root.join("target/packages"))
        .map_err(|e| format!("target/packages: {e}"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or("no .deb in target/packages (packaging/build-deb.sh)")?;
    let t = Instant::now();
    let out = Command::new("dpkg")
        .arg("-i")
        .arg(&deb)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .map_err(|e| format!("dpkg: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(crate::guest::log_dir().join("dpkg-install.txt"), &text)
        .map_err(|e| e.to_string())?;
    check!(out.status.success(), "dpkg -i {}: {text}", deb.display());
    println!(
        "  dpkg -i {} in {:.1} s",
        deb.file_name().unwrap().to_string_lossy(),
        t.elapsed().as_secs_f64()
    );
    check_eq!(
        systemctl(&["is-enabled", SOCKET_UNIT])?.trim().to_string(),
        "enabled".to_string(),
        "reservd.socket enabled by the postinst"
    );
    wait_state(SOCKET_UNIT, "active", 10)?;
    check_eq!(
        active_state(SERVICE)?,
        "inactive".to_string(),
        "reservd.service before any client"
    );
    let meta = std::fs::metadata(SOCKET).map_err(|e| format!("{SOCKET}: {e}"))?;
    check!(meta.file_type().is_socket(), "{SOCKET} is not a socket");
    use std::os::unix::fs::PermissionsExt;
    check_eq!(meta.permissions().mode() & 0o777, 0o600, "socket mode");
    check!(
        prop(SOCKET_UNIT, "Listen")?.contains("/run/qemu-pr-helper.sock (Stream)"),
        "Listen: {}",
        prop(SOCKET_UNIT, "Listen")?
    );
    Ok(())
}

/// The first connection starts reservd.service; it is Type=notify and
/// becomes active only once reservd says READY=1, with its status line,
/// which follows libmpathpersist's loading; then it serves real disks.
fn systemd_socket_activation_and_notify_readiness() -> TestResult {
    check_eq!(active_state(SERVICE)?, "inactive".to_string(), "before");
    check_eq!(prop(SERVICE, "Type")?, "notify".to_string(), "Type");
    let t = Instant::now();
    let mut c = connect(Duration::from_secs(60))?;
    println!(
        "  first handshake through the socket unit after {} ms",
        t.elapsed().as_millis()
    );
    check_eq!(c.server_features, 0, "features (no --enable-cleanup)");
    // Active (not "activating") means systemd received READY=1.
    wait_state(SERVICE, "active", 30)?;
    check_eq!(
        prop(SERVICE, "SubState")?,
        "running".to_string(),
        "SubState"
    );
    check_eq!(
        prop(SERVICE, "TriggeredBy")?,
        SOCKET_UNIT.to_string(),
        "TriggeredBy"
    );
    let status = prop(SERVICE, "StatusText")?;
    check!(
        status.starts_with("serving; multipath support: "),
        "StatusText {status:?} (sent with READY=1)"
    );
    wait_for(
        Duration::from_secs(30),
        "StatusText never says multipath support is active",
        || Ok(prop(SERVICE, "StatusText")?.contains("multipath support: active")),
    )?;
    let pid = main_pid(SERVICE)?;
    check_eq!(
        exe_of(pid)?,
        PathBuf::from("/usr/bin/reservd"),
        "MainPID's binary"
    );
    // Nothing in the sandbox gets in the way: no warning from reservd or
    // the libraries it loaded (libmultipath raising the open-file limit,
    // for one).
    let warnings = journal(&[
        &format!("_SYSTEMD_UNIT={SERVICE}"),
        "-p",
        "warning",
        "-o",
        "cat",
    ])?;
    check!(
        warnings.trim().is_empty(),
        "warnings in reservd's journal: {warnings}"
    );
    check_eq!(
        prop(SERVICE, "WatchdogUSec")?,
        "30s".to_string(),
        "the packaged unit's WatchdogSec"
    );
    // The daemon serves the disks: SG_IO on the single-path disk, and
    // libmpathpersist on the map (the key on both paths).
    let sp = sp_dev();
    reset_lun(&mut c, &sp)?;
    expect_good(
        &pr_out(&mut c, &sp, prout_sa::REGISTER, 0, &keys(0, 0x5d01))?,
        "REGISTER on the single-path disk",
    )?;
    check_eq!(device_keys(&sp)?, vec![0x5d01], "single-path disk keys");
    reset_lun(&mut c, &sp)?;
    let mp = mp_dev();
    expect_good(
        &past_ua(|| pr_out(&mut c, &mp, prout_sa::REGISTER, 0, &keys(0, 0x5d02)))?,
        "REGISTER on the map",
    )?;
    let (p1, p2) = mp_paths();
    check_eq!(
        device_keys(&p1)?,
        vec![0x5d02, 0x5d02],
        "keys read on path 1"
    );
    check_eq!(
        device_keys(&p2)?,
        vec![0x5d02, 0x5d02],
        "keys read on path 2"
    );
    expect_good(
        &past_ua(|| pr_out(&mut c, &mp, prout_sa::REGISTER, 0, &keys(0x5d02, 0)))?,
        "unregister on the map",
    )?;
    check_eq!(
        device_keys(&p1)?,
        Vec::<u64>::new(),
        "keys after unregistering"
    );
    Ok(())
}

/// Fields of /proc/PID/status.
fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or("")
        .trim()
        .to_string()
}

/// One line of /proc/PID/mountinfo: mount point, per-mount options, file
/// system type, super block options.
struct Mount {
    point: String,
    opts: Vec<String>,
    fstype: String,
    super_opts: Vec<String>,
}

fn mounts(pid: u32) -> Result<Vec<Mount>, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .map_err(|e| format!("/proc/{pid}/mountinfo: {e}"))?;
    let mut v = Vec::new();
    for line in text.lines() {
        let (left, right) = line
            .split_once(" - ")
            .ok_or("mountinfo line without ' - '")?;
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 6 || r.len() < 3 {
            return Err(format!("mountinfo line: {line}"));
        }
        v.push(Mount {
            point: l[4].replace("\\040", " "),
            opts: l[5].split(',').map(String::from).collect(),
            fstype: r[0].to_string(),
            super_opts: r[2].split(',').map(String::from).collect(),
        });
    }
    Ok(v)
}

/// The mount a path is on: the last mounted at the longest mount point
/// that contains it.
fn covering<'a>(ms: &'a [Mount], path: &str) -> Option<&'a Mount> {
    let mut best: Option<&Mount> = None;
    for m in ms {
        let inside = path == m.point
            || m.point == "/"
            || path.starts_with(&format!("{}/", m.point.trim_end_matches('/')));
        if inside && best.is_none_or(|b| m.point.len() >= b.point.len()) {
            best = Some(m);
        }
    }
    best
}

/// The unit's sandbox, read from the running daemon: root with
/// CAP_SYS_RAWIO and CAP_SYS_ADMIN only, an empty bounding set,
/// NO_NEW_PRIVS, seccomp filters (systemd's and reservd's own), and a
/// mount namespace where the system is read-only, /tmp is private, home
/// directories are hidden and /proc shows no other process.
fn systemd_hardening_in_force_in_the_running_process() -> TestResult {
    let mut c = connect(Duration::from_secs(60))?;
    read_keys_good(&mut c, &sp_dev())?;
    wait_state(SERVICE, "active", 30)?;
    let pid = main_pid(SERVICE)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    let log = crate::guest::log_dir().join("reservd-systemd-status.txt");
    let _ = std::fs::write(&log, &status);
    check_eq!(
        status_field(&status, "Uid"),
        "0\t0\t0\t0".to_string(),
        "Uid"
    );
    // CAP_SYS_RAWIO (17) and CAP_SYS_ADMIN (21): multipath support is on.
    // The bounding set is the unit's CapabilityBoundingSet= (reservd
    // empties it only when it holds CAP_SETPCAP, which the unit withholds).
    for k in ["CapEff", "CapPrm", "CapBnd"] {
        check_eq!(
            status_field(&status, k),
            "0000000000220000".to_string(),
            "{k}"
        );
    }
    for k in ["CapInh", "CapAmb"] {
        check_eq!(
            status_field(&status, k),
            "0000000000000000".to_string(),
            "{k}"
        );
    }
    check_eq!(
        status_field(&status, "NoNewPrivs"),
        "1".to_string(),
        "NoNewPrivs"
    );
    check_eq!(
        status_field(&status, "Seccomp"),
        "2".to_string(),
        "Seccomp (filter mode)"
    );
    let filters: u32 = status_field(&status, "Seccomp_filters")
        .parse()
        .map_err(|e| format!("Seccomp_filters: {e}"))?;
    check!(
        filters >= 2,
        "{filters} seccomp filter(s): systemd's SystemCallFilter= and reservd's own expected"
    );
    // Its own mount namespace.
    let ns = |p: &str| std::fs::read_link(p).map_err(|e| format!("{p}: {e}"));
    check!(
        ns(&format!("/proc/{pid}/ns/mnt"))? != ns("/proc/self/ns/mnt")?,
        "reservd shares the test's mount namespace"
    );
    let ms = mounts(pid)?;
    let mut seen = Vec::new();
    for p in [
        "/",
        "/usr",
        "/etc",
        "/var",
        "/usr/lib/modules",
        "/proc/sys",
        "/sys",
        "/sys/fs/cgroup",
    ] {
        let m = covering(&ms, p).ok_or(format!("no mount covers {p}"))?;
        check!(
            m.opts.iter().any(|o| o == "ro"),
            "{p} is writable for reservd (mount {} {:?})",
            m.point,
            m.opts
        );
        seen.push(format!("{p}: ro ({} on {})", m.fstype, m.point));
    }
    let proc_mount = covering(&ms, "/proc").ok_or("no /proc")?;
    check!(
        proc_mount
            .super_opts
            .iter()
            .any(|o| o == "hidepid=invisible"),
        "/proc without hidepid=invisible: {:?}",
        proc_mount.super_opts
    );
    // PrivateTmp and ProtectHome: what the system has there, reservd does not see.
    let marker = format!("reservd-systemd-test-{}", std::process::id());
    for dir in ["/tmp", "/root", "/home"] {
        let ours = Path::new(dir).join(&marker);
        std::fs::write(&ours, b"x").map_err(|e| format!("{}: {e}", ours.display()))?;
        let theirs = PathBuf::from(format!("/proc/{pid}/root{dir}/{marker}"));
        let visible = theirs.exists();
        let _ = std::fs::remove_file(&ours);
        check!(!visible, "reservd sees {} in its {dir}", ours.display());
        seen.push(format!("{dir}: not the system's"));
    }
    println!("  pid {pid}: caps 0x220000 (bounding set the same), NoNewPrivs, seccomp filters {filters}; {}", seen.join(", "));
    // systemd's own reading of the sandbox.
    let sec = run("systemd-analyze", &["security", "--no-pager", SERVICE])?;
    let line = sec
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .ok_or("no exposure level from systemd-analyze security")?;
    let level: f64 = line
        .split(':')
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or(format!("cannot read {line:?}"))?;
    println!("  {}", line.trim());
    check!(level.total_cmp(&2.5).is_le(), "{line}");
    Ok(())
}

/// Every PR OUT leaves a journal record with its fields:
/// `journalctl RESERVD_WWID=...` finds one LU's history.
fn systemd_audit_records_in_the_journal() -> TestResult {
    let mut c = connect(Duration::from_secs(60))?;
    let mp = mp_dev();
    let key = 0x5d0a_0000_0000_0001u64;
    expect_good(
        &past_ua(|| pr_out(&mut c, &mp, prout_sa::REGISTER, 0, &keys(0, key)))?,
        "REGISTER on the map",
    )?;
    expect_good(
        &past_ua(|| pr_out(&mut c, &mp, prout_sa::REGISTER, 0, &keys(key, 0)))?,
        "unregister on the map",
    )?;
    let wwid = env("RESERVD_MP_WWID");
    let mut text = String::new();
    wait_for(
        Duration::from_secs(10),
        "the map's records in the journal",
        || {
            text = journal(&[
            "-u",
            SERVICE,
            &format!("RESERVD_WWID={wwid}"),
            "-o",
            "json",
            "--output-fields=RESERVD_SA,RESERVD_KEY,RESERVD_SA_KEY,RESERVD_STATUS,RESERVD_MAP,RESERVD_BACKEND,RESERVD_WWID,PRIORITY",
        ])?;
            Ok(text.contains(&format!("\"RESERVD_KEY\":\"{key:#x}\"")))
        },
    )?;
    let records: Vec<&str> = text.lines().filter(|l| l.starts_with('{')).collect();
    let _ = std::fs::write(crate::guest::log_dir().join("journal-audit.json"), &text);
    let register = records.iter().find(|r| {
        r.contains(&format!("\"RESERVD_SA_KEY\":\"{key:#x}\""))
            && r.contains("\"RESERVD_KEY\":\"0x0\"")
    });
    let unregister = records.iter().find(|r| {
        r.contains(&format!("\"RESERVD_KEY\":\"{key:#x}\""))
            && r.contains("\"RESERVD_SA_KEY\":\"0x0\"")
    });
    for (what, r) in [("REGISTER", register), ("unregister", unregister)] {
        let r = r.ok_or(format!("no journal record of the {what}: {text}"))?;
        for field in [
            "\"RESERVD_SA\":\"REGISTER\"".to_string(),
            "\"RESERVD_STATUS\":\"GOOD\"".to_string(),
            format!("\"RESERVD_MAP\":\"{}\"", env("RESERVD_MP_ALIAS")),
            "\"RESERVD_BACKEND\":\"multipath\"".to_string(),
            format!("\"RESERVD_WWID\":\"{wwid}\""),
        ] {
            check!(r.contains(&field), "{what} record lacks {field}: {r}");
        }
    }
    // The filter is exact: another LU's records are not among them.
    check!(
        !records.iter().any(|r| r.contains(&env("RESERVD_SP_WWID"))),
        "a single-path disk record under the map's WWID: {text}"
    );
    // A disk outside multipath is named as multipath would name it: the
    // kernel's naa.… becomes 3….
    let sp_dev = sp_dev();
    let sp_name = sp_dev.file_name().unwrap().to_string_lossy().into_owned();
    let kernel_wwid = std::fs::read_to_string(format!("/sys/block/{sp_name}/device/wwid"))
        .map_err(|e| format!("wwid of {sp_name}: {e}"))?;
    let sp_wwid = env("RESERVD_SP_WWID");
    check_eq!(
        kernel_wwid.trim().strip_prefix("naa."),
        sp_wwid.strip_prefix('3'),
        "the single-path disk's kernel WWID"
    );
    let sp = journal(&[
        "-u",
        SERVICE,
        &format!("RESERVD_WWID={sp_wwid}"),
        "-o",
        "cat",
    ])?;
    check!(
        sp.lines()
            .any(|l| l.contains("audit: PR OUT REGISTER") && l.contains("sa_key=0x5d01")),
        "the single-path disk's REGISTER is not in its history: {sp}"
    );
    println!(
        "  {} record(s) for the map, the single-path disk's apart",
        records.len()
    );
    Ok(())
}

/// `systemctl stop` while a command is in flight: reservd finishes it and
/// answers before it exits; the socket stays. The command is held in
/// flight by stopping multipathd, which a PR OUT on the map asks for the
/// map's key before anything is sent.
const DRAIN_KEY: u64 = 0x5d0d;

fn systemd_stop_drains_a_command_in_flight() -> TestResult {
    let mut c = connect(Duration::from_secs(60))?;
    read_keys_good(&mut c, &mp_dev())?;
    wait_state(SERVICE, "active", 30)?;
    let pid = main_pid(SERVICE)?;
    let mpathd = main_pid("multipathd.service")?;
    check!(mpathd > 0, "multipathd.service has no main process");
    let mpathd = Pid::from_raw(mpathd as i32);
    kill(mpathd, Signal::SIGSTOP).map_err(|e| format!("SIGSTOP multipathd: {e}"))?;
    let result = (|| -> TestResult {
        let (tx, rx) = mpsc::channel();
        let mp = mp_dev();
        std::thread::spawn(move || {
            let r = pr_out(
                &mut c,
                &mp,
                prout_sa::REGISTER_AND_IGNORE,
                0,
                &keys(0, DRAIN_KEY),
            );
            let _ = tx.send((r, Instant::now()));
        });
        // (reservd waits up to 10 s for multipathd's answer: the steps up to
        // SIGCONT stay well within that)
        std::thread::sleep(Duration::from_millis(1000));
        check!(
            rx.try_recv().is_err(),
            "REGISTER on the map answered while multipathd is stopped"
        );
        let t_stop = Instant::now();
        let stopper = std::thread::spawn(|| systemctl(&["stop", SERVICE]));
        wait_state(SERVICE, "deactivating", 5)?;
        std::thread::sleep(Duration::from_millis(500));
        check!(
            rx.try_recv().is_err(),
            "the command in flight was answered before multipathd could reply"
        );
        check_eq!(
            active_state(SERVICE)?,
            "deactivating".to_string(),
            "while draining"
        );
        let t_cont = Instant::now();
        kill(mpathd, Signal::SIGCONT).map_err(|e| format!("SIGCONT multipathd: {e}"))?;
        let (r, answered) = rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| "no answer to the command in flight")?;
        expect_good(&r?, "REGISTER in flight during systemctl stop")?;
        check!(
            answered >= t_cont,
            "answered before multipathd was continued"
        );
        stopper.join().map_err(|_| "systemctl stop panicked")??;
        let took = t_stop.elapsed();
        check_eq!(active_state(SERVICE)?, "inactive".to_string(), "after stop");
        check_eq!(prop(SERVICE, "Result")?, "success".to_string(), "Result");
        check!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "reservd {pid} still runs"
        );
        check_eq!(
            active_state(SOCKET_UNIT)?,
            "active".to_string(),
            "the socket after stop"
        );
        check!(Path::new(SOCKET).exists(), "{SOCKET} gone after stop");
        println!(
            "  systemctl stop returned after {:.1} s, once the command in flight was answered",
            took.as_secs_f64()
        );
        // The registration landed; the next connection starts reservd
        // again and removes it.
        let mut c = connect(Duration::from_secs(60))?;
        let r = past_ua(|| {
            pr_out(
                &mut c,
                &mp_dev(),
                prout_sa::REGISTER,
                0,
                &keys(DRAIN_KEY, 0),
            )
        })?;
        expect_good(&r, "unregistering after the drain")?;
        Ok(())
    })();
    let _ = kill(mpathd, Signal::SIGCONT);
    result
}

/// kill -9 of the daemon: the socket unit keeps listening; a client that
/// connects meanwhile waits in the socket's backlog and is served by the
/// next reservd; the old connection fails at its next CDB, where QEMU
/// reconnects and sends it again.
fn systemd_kill9_socket_stays_next_connection_starts_it_again() -> TestResult {
    let sp = sp_dev();
    let mut old = connect(Duration::from_secs(60))?;
    read_keys_good(&mut old, &sp)?;
    wait_state(SERVICE, "active", 30)?;
    let p1 = main_pid(SERVICE)?;
    kill(Pid::from_raw(p1 as i32), Signal::SIGKILL).map_err(|e| format!("kill -9: {e}"))?;
    // Connected while no reservd runs: the handshake comes from the next one.
    let t = Instant::now();
    let mut fresh = connect(Duration::from_secs(60))?;
    read_keys_good(&mut fresh, &sp)?;
    println!(
        "  a connection made right after kill -9 was answered in {} ms",
        t.elapsed().as_millis()
    );
    check_eq!(
        active_state(SOCKET_UNIT)?,
        "active".to_string(),
        "the socket"
    );
    wait_state(SERVICE, "active", 30)?;
    let p2 = main_pid(SERVICE)?;
    check!(p2 != 0 && p2 != p1, "MainPID {p2} after killing {p1}");
    // The old connection is dead: the next command fails (QEMU then
    // reconnects and sends it again) instead of hanging.
    let r = pr_in(&mut old, &sp, prin_sa::READ_KEYS, 8192);
    check!(
        r.is_err(),
        "a command on the killed daemon's connection: {r:?}"
    );
    let mut again = connect(Duration::from_secs(60))?;
    read_keys_good(&mut again, &sp)?;
    wait_for(
        Duration::from_secs(10),
        "the journal does not record the kill",
        || Ok(journal(&["-u", SERVICE, "-o", "cat"])?.contains("status=9/KILL")),
    )
}

/// The thread running reservd's event loop: the one waiting in epoll.
fn loop_thread(pid: u32) -> Result<i32, String> {
    let dir = format!("/proc/{pid}/task");
    let mut found = Vec::new();
    for t in std::fs::read_dir(&dir)
        .map_err(|e| format!("{dir}: {e}"))?
        .flatten()
    {
        let sc = std::fs::read_to_string(t.path().join("syscall")).unwrap_or_default();
        // epoll_wait (232) or epoll_pwait (281) on x86-64
        if sc.starts_with("232 ") || sc.starts_with("281 ") {
            found.push(
                t.file_name()
                    .to_string_lossy()
                    .parse::<i32>()
                    .map_err(|e| e.to_string())?,
            );
        }
    }
    match found[..] {
        [tid] => Ok(tid),
        _ => Err(format!("threads of {pid} in epoll_wait: {found:?}")),
    }
}

/// Stop one thread with ptrace (the rest of the process runs on), and keep
/// it stopped until it dies or `release` is set. Signals it receives are
/// passed on; its end is reaped, so that the process can end.
fn freeze_thread(tid: i32, release: Arc<AtomicBool>) -> Result<mpsc::Receiver<String>, String> {
    use nix::sys::ptrace;
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let t = Pid::from_raw(tid);
        if let Err(e) =
            ptrace::seize(t, ptrace::Options::empty()).and_then(|_| ptrace::interrupt(t))
        {
            let _ = tx.send(format!("error: ptrace {tid}: {e}"));
            return;
        }
        let mut stopped = false;
        loop {
            if release.load(Ordering::SeqCst) {
                let _ = ptrace::detach(t, None);
                let _ = tx.send("released".into());
                return;
            }
            match waitpid(t, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(20)),
                Ok(WaitStatus::PtraceEvent(..)) if !stopped => {
                    stopped = true;
                    let _ = tx.send("stopped".into());
                }
                Ok(WaitStatus::Stopped(_, sig)) => {
                    // A signal for this thread: deliver it (it may end the process).
                    let _ = tx.send(format!("signal {sig:?}"));
                    let _ = ptrace::cont(t, Some(sig));
                }
                Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) | Err(_) => {
                    let _ = tx.send("gone".into());
                    return;
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    Ok(rx)
}

/// With WatchdogSec= the event loop sends WATCHDOG=1 as it turns (a
/// drop-in sets 5 s for the test). One
/// thread of the running daemon, the one waiting in epoll for the loop, is
/// stopped with ptrace: the process lives on, but its loop no longer turns
/// (a client gets no handshake). systemd misses the keep-alives, kills
/// reservd (SIGABRT) and starts it again, and the waiting client is served
/// by the new one.
fn systemd_watchdog_restarts_a_wedged_event_loop() -> TestResult {
    std::fs::create_dir_all(Path::new(WATCHDOG_DROPIN).parent().unwrap())
        .map_err(|e| e.to_string())?;
    // A short watchdog for the test; TimeoutAbortSec bounds the abort.
    std::fs::write(
        WATCHDOG_DROPIN,
        "[Service]\nWatchdogSec=5s\nTimeoutAbortSec=10s\n",
    )
    .map_err(|e| format!("{WATCHDOG_DROPIN}: {e}"))?;
    let result = (|| -> TestResult {
        systemctl(&["daemon-reload"])?;
        systemctl(&["stop", SERVICE])?;
        let sp = sp_dev();
        let mut c = connect(Duration::from_secs(60))?;
        read_keys_good(&mut c, &sp)?;
        wait_state(SERVICE, "active", 30)?;
        // (the property is the running instance's)
        let w = prop(SERVICE, "WatchdogUSec")?;
        check!(
            w == "5s",
            "WatchdogUSec {w} with the drop-in {WATCHDOG_DROPIN}: {}",
            systemctl(&["cat", SERVICE])?
        );
        let p1 = main_pid(SERVICE)?;
        // Keep-alives arrive: the last one's time advances, and no restart
        // happens over several watchdog periods.
        let first = prop(SERVICE, "WatchdogTimestampMonotonic")?;
        std::thread::sleep(Duration::from_secs(7));
        let later = prop(SERVICE, "WatchdogTimestampMonotonic")?;
        check!(
            first != later && later != "0",
            "WatchdogTimestamp did not move: {first} then {later}"
        );
        check_eq!(main_pid(SERVICE)?, p1, "MainPID while the loop turns");
        read_keys_good(&mut c, &sp)?;
        let restarts: u32 = prop(SERVICE, "NRestarts")?.parse().unwrap_or(0);
        // Wedge the loop.
        let tid = loop_thread(p1)?;
        let release = Arc::new(AtomicBool::new(false));
        let events = freeze_thread(tid, Arc::clone(&release))?;
        let first_event = events
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| "the loop thread did not stop")?;
        let wedged = (|| -> TestResult {
            check_eq!(first_event, "stopped".to_string(), "ptrace");
            let t_wedge = Instant::now();
            // Alive, but no handshake for a new client.
            let waiting = UnixStream::connect(SOCKET).map_err(|e| e.to_string())?;
            waiting
                .set_read_timeout(Some(Duration::from_millis(1500)))
                .map_err(|e| e.to_string())?;
            let mut hello = [0u8; 4];
            check!(
                (&waiting).read_exact(&mut hello).is_err(),
                "a handshake from the wedged daemon"
            );
            check!(
                Path::new(&format!("/proc/{p1}")).exists(),
                "reservd {p1} died on its own"
            );
            wait_for(
                Duration::from_secs(40),
                "no new reservd after the watchdog",
                || {
                    let p = main_pid(SERVICE)?;
                    Ok(p != 0 && p != p1 && active_state(SERVICE)? == "active")
                },
            )?;
            let restarted_after = t_wedge.elapsed();
            check!(
                !Path::new(&format!("/proc/{p1}")).exists(),
                "the wedged reservd {p1} still exists"
            );
            let n: u32 = prop(SERVICE, "NRestarts")?.parse().unwrap_or(0);
            check!(n > restarts, "NRestarts {n} (was {restarts})");
            wait_for(
                Duration::from_secs(10),
                "the journal does not name the watchdog",
                || Ok(journal(&["-u", SERVICE, "-o", "cat"])?.contains("Watchdog timeout")),
            )?;
            // The client that waited in the backlog is served now.
            waiting
                .set_read_timeout(Some(Duration::from_secs(60)))
                .map_err(|e| e.to_string())?;
            let mut w = Client::handshake(waiting, 0)
                .map_err(|e| format!("the waiting client's handshake: {e}"))?;
            read_keys_good(&mut w, &sp)?;
            println!(
                "  loop thread {tid} of {p1} stopped: restarted by the watchdog after {:.1} s; \
                 the waiting client was served by the new reservd",
                restarted_after.as_secs_f64()
            );
            Ok(())
        })();
        release.store(true, Ordering::SeqCst);
        wedged
    })();
    let _ = std::fs::remove_file(WATCHDOG_DROPIN);
    let _ = systemctl(&["daemon-reload"]);
    let _ = systemctl(&["stop", SERVICE]);
    result
}

/// QEMU's own units (as QEMU ships them in contrib/systemd and Fedora's
/// qemu-pr-helper package installs them) listen on the same path.
const QEMU_SOCKET_UNIT: &str = "[Unit]
Description=Persistent Reservation Daemon for QEMU

[Socket]
ListenStream=/run/qemu-pr-helper.sock
SocketMode=0600

[Install]
WantedBy=multi-user.target
";
const QEMU_SERVICE_UNIT: &str = "[Unit]
Description=Persistent Reservation Daemon for QEMU

[Service]
WorkingDirectory=/tmp
Type=simple
ExecStart=/usr/bin/qemu-pr-helper
PrivateTmp=yes
ProtectSystem=strict
ReadWritePaths=/var/run
RestrictAddressFamilies=AF_UNIX
Restart=always
RestartSec=0

[Install]
";

/// The daemon that answers on the socket: a client connects, and the
/// service it started is asked for its binary.
fn who_answers(service: &str) -> Result<PathBuf, String> {
    let mut c = connect(Duration::from_secs(60))?;
    read_keys_good(&mut c, &sp_dev())?;
    wait_state(service, "active", 30)?;
    exe_of(main_pid(service)?)
}

/// Starting QEMU's qemu-pr-helper.socket stops reservd's units, and the
/// other way round; each time the path exists and the started one
/// answers. Starting both at once is refused.
fn systemd_conflicts_with_qemus_own_socket_units() -> TestResult {
    check!(
        Path::new("/usr/bin/qemu-pr-helper").exists(),
        "no /usr/bin/qemu-pr-helper (qemu-system-common)"
    );
    let dir = Path::new("/etc/systemd/system");
    std::fs::write(dir.join("qemu-pr-helper.socket"), QEMU_SOCKET_UNIT)
        .map_err(|e| e.to_string())?;
    std::fs::write(dir.join("qemu-pr-helper.service"), QEMU_SERVICE_UNIT)
        .map_err(|e| e.to_string())?;
    systemctl(&["daemon-reload"])?;
    systemctl(&["start", SOCKET_UNIT])?;
    check_eq!(
        who_answers(SERVICE)?,
        PathBuf::from("/usr/bin/reservd"),
        "at first"
    );
    for round in 1..=2 {
        systemctl(&["start", "qemu-pr-helper.socket"])?;
        check_eq!(
            active_state(SOCKET_UNIT)?,
            "inactive".to_string(),
            "reservd.socket, round {round}"
        );
        check_eq!(
            active_state(SERVICE)?,
            "inactive".to_string(),
            "reservd.service, round {round}"
        );
        check!(
            Path::new(SOCKET).exists(),
            "{SOCKET} missing with qemu-pr-helper.socket, round {round}"
        );
        check_eq!(
            who_answers("qemu-pr-helper.service")?,
            PathBuf::from("/usr/bin/qemu-pr-helper"),
            "the daemon behind the socket, round {round}"
        );
        systemctl(&["start", SOCKET_UNIT])?;
        check_eq!(
            active_state("qemu-pr-helper.socket")?,
            "inactive".to_string(),
            "qemu-pr-helper.socket, round {round}"
        );
        check_eq!(
            active_state("qemu-pr-helper.service")?,
            "inactive".to_string(),
            "qemu-pr-helper.service, round {round}"
        );
        check!(
            Path::new(SOCKET).exists(),
            "{SOCKET} missing with reservd.socket, round {round}"
        );
        check_eq!(
            who_answers(SERVICE)?,
            PathBuf::from("/usr/bin/reservd"),
            "the daemon behind the socket, round {round}"
        );
    }
    // Both in one transaction: refused, and reservd keeps the socket.
    let both = systemctl(&["start", "qemu-pr-helper.socket", SOCKET_UNIT]);
    check!(both.is_err(), "starting both conflicting sockets succeeded");
    check_eq!(
        active_state(SOCKET_UNIT)?,
        "active".to_string(),
        "reservd.socket after the refusal"
    );
    check_eq!(
        who_answers(SERVICE)?,
        PathBuf::from("/usr/bin/reservd"),
        "after the refusal"
    );
    Ok(())
}
