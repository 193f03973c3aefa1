//! Guest scenarios for the operator tools: `reservdctl status` (per-path
//! keys, verdict, `--repair`), `reservdctl check`, reservd's audit trail,
//! its metrics (`--metrics-socket`, `--metrics-file`, `reservdctl
//! metrics`) and `reservdctl validate`, on the test bed's two-path
//! multipath map.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use reservd_proto::cdb::{prin_sa, prout_sa};

use reservd_testkit::spawn::{Daemon, Ready};

use crate::guest::{
    device_keys, device_reservation, env, expect_good, keys, mp_paths, past_ua, pr_in, pr_out,
    reservd, reset_lun, sg_persist, Scenario, TestResult,
};

/// The key the scenarios register on the map.
const KEY: u64 = 0x0a5e_0000_0000_0001;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        ("ops_status_consistent_map", ops_status_consistent_map),
        (
            "ops_status_path_lost_its_key_and_repair",
            ops_status_path_lost_its_key_and_repair,
        ),
        ("ops_check_all_good", ops_check_all_good),
        (
            "ops_systemd_status_follows_multipath_loading",
            ops_systemd_status_follows_multipath_loading,
        ),
        ("ops_audit_trail", ops_audit_trail),
        (
            "ops_library_messages_reach_reservds_log_at_their_level",
            ops_library_messages_reach_reservds_log_at_their_level,
        ),
        (
            "ops_metrics_count_the_commands_on_the_map",
            ops_metrics_count_the_commands_on_the_map,
        ),
        (
            "ops_validate_passes_on_a_clean_map",
            ops_validate_passes_on_a_clean_map,
        ),
        (
            "ops_validate_refuses_a_map_another_node_holds",
            ops_validate_refuses_a_map_another_node_holds,
        ),
        // Last: multipathd may re-register the key when the path returns.
        (
            "ops_status_offline_path_is_not_counted",
            ops_status_offline_path_is_not_counted,
        ),
    ]
}

fn mp_dev() -> PathBuf {
    PathBuf::from(env("RESERVD_MP_DEV"))
}

fn name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

/// A scratch directory under /run, made empty, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Result<Scratch, String> {
        let dir = PathBuf::from(format!("/run/reservd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Scratch(dir))
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// reservd started as systemd would start it: in `dir` (its socket
/// `s.sock`), with one variable of systemd's environment, its stderr in
/// `log`.
fn under_systemd(
    dir: &Scratch,
    args: &[&str],
    var: (&str, &std::ffi::OsStr),
    log: &Path,
) -> Result<Daemon, String> {
    let socket = dir.join("s.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_reservd"));
    cmd.arg("-k").arg(&socket).args(args).env(var.0, var.1);
    Daemon::start(cmd, &socket, log, Ready::Socket)
}

/// Under systemd (Type=notify), reservd says READY=1 with a status line
/// once serving, and a second status line once libmpathpersist, loaded in
/// the background, is active.
fn ops_systemd_status_follows_multipath_loading() -> TestResult {
    use std::os::unix::net::UnixDatagram;
    let dir = Scratch::new("notify")?;
    let notify_path = dir.join("notify");
    let notify = UnixDatagram::bind(&notify_path).map_err(|e| e.to_string())?;
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let _d = under_systemd(
        &dir,
        &[],
        ("NOTIFY_SOCKET", notify_path.as_os_str()),
        &dir.join("stderr"),
    )?;
    let mut buf = [0u8; 512];
    let mut recv = || -> Result<String, String> {
        let n = notify
            .recv(&mut buf)
            .map_err(|e| format!("no notification: {e}"))?;
        Ok(String::from_utf8_lossy(&buf[..n]).to_string())
    };
    let first = recv()?;
    check!(
        first == "READY=1\nSTATUS=serving; multipath support: loading libmpathpersist",
        "first notification: {first:?}"
    );
    let second = recv()?;
    let release = env("RESERVD_MPATH_VERSION");
    check!(
        second.starts_with(&format!(
            "STATUS=serving; multipath support: active (multipath-tools {release}"
        )),
        "second notification: {second:?}"
    );
    Ok(())
}

/// multipath-tools' own messages reach reservd's log at their level: with
/// stderr going to the journal (JOURNAL_STREAM names it), each line carries
/// its journal priority (libmultipath's level 3, "sending pr in command",
/// is debug: <7>), and nothing goes to the syslog socket or onto stderr in
/// the library's own format.
fn ops_library_messages_reach_reservds_log_at_their_level() -> TestResult {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::net::UnixDatagram;
    let dir = Scratch::new("journal")?;
    // /dev/log stands for the journal's syslog socket (none in the bed).
    let devlog = Path::new("/dev/log");
    let _ = std::fs::remove_file(devlog);
    let syslog = UnixDatagram::bind(devlog).map_err(|e| format!("/dev/log: {e}"))?;
    syslog
        .set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    // Drained all along, as the journal does: a datagram socket's queue is
    // short, and a sender blocks once it is full.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(n) = syslog.recv(&mut buf) {
                    got.push(String::from_utf8_lossy(&buf[..n]).to_string());
                }
            }
            got
        })
    };
    let err_path = dir.join("stderr");
    let err = std::fs::File::create(&err_path).map_err(|e| e.to_string())?;
    let meta = err.metadata().map_err(|e| e.to_string())?;
    // -vv: libmultipath at verbosity 3, which names the path each command
    // it sends goes to.
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    drop(err);
    // Its stderr is that file (the same inode, truncated again).
    let d = under_systemd(
        &dir,
        &["-v", "-v"],
        ("JOURNAL_STREAM", stream.as_ref()),
        &err_path,
    )?;
    let socket = d.socket.clone();
    let result = (|| -> TestResult {
        let mut c = reservd_client::client::Client::connect(&socket)
            .map_err(|e| format!("connect: {e}"))?;
        c.stream()
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        // A RESERVE goes through libmpathpersist (PR IN does not: it goes
        // down the map).
        let dev = mp_dev();
        let k = 0x5e5e_0000_0000_0001;
        let r = past_ua(|| pr_out(&mut c, &dev, prout_sa::REGISTER_AND_IGNORE, 0, &keys(0, k)))?;
        expect_good(&r, "REGISTER AND IGNORE EXISTING KEY on the map")?;
        let r = past_ua(|| pr_out(&mut c, &dev, prout_sa::RESERVE, 5, &keys(k, 0)))?;
        expect_good(&r, "RESERVE on the map")?;
        let r = past_ua(|| pr_out(&mut c, &dev, prout_sa::RELEASE, 5, &keys(k, 0)))?;
        expect_good(&r, "RELEASE on the map")?;
        let r = past_ua(|| pr_out(&mut c, &dev, prout_sa::REGISTER, 0, &keys(k, 0)))?;
        expect_good(&r, "unregister on the map")?;
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let got = reader.join().map_err(|_| "syslog reader panicked")?;
        // (udev's rules log there too, under their own names.)
        let ours: Vec<&String> = got.iter().filter(|m| m.contains("reservd")).collect();
        check!(
            ours.is_empty(),
            "reservd's messages on the syslog socket: {ours:?}"
        );
        let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
        check!(
            stderr.lines().all(|l| l.starts_with('<')),
            "every stderr line carries a journal priority (nothing printed by libmultipath \
             itself): {stderr}"
        );
        check!(
            stderr
                .lines()
                .any(|l| l.starts_with("<7>") && l.contains("sending pr out command to")),
            "libmultipath's own line for the RESERVE, at debug priority: {stderr}"
        );
        Ok(())
    })();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    drop(d);
    let _ = std::fs::remove_file(devlog);
    result
}

fn reservdctl(args: &[&str], stdin: Stdio) -> Result<Output, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_reservdctl"))
        .args(args)
        .stdin(stdin)
        .output()
        .map_err(|e| format!("running reservdctl: {e}"))?;
    println!(
        "  $ reservdctl {} -> {}\n{}{}",
        args.join(" "),
        out.status,
        indent(&String::from_utf8_lossy(&out.stdout)),
        indent(&String::from_utf8_lossy(&out.stderr)),
    );
    Ok(out)
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    | {l}\n")).collect()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A map with KEY registered through reservd (both paths).
fn registered_map(d: &Daemon) -> TestResult {
    let dev = mp_dev();
    let mut c = d.client()?;
    reset_lun(&mut c, &dev)?;
    expect_good(
        &past_ua(|| pr_out(&mut c, &dev, prout_sa::REGISTER, 0, &keys(0, KEY)))?,
        "REGISTER on the map",
    )?;
    let (p1, p2) = mp_paths();
    check!(
        device_keys(&p1)? == vec![KEY, KEY],
        "both nexuses registered: {:x?}",
        device_keys(&p1)?
    );
    let _ = device_keys(&p2)?;
    Ok(())
}

fn unregister_map(d: &Daemon) -> TestResult {
    let dev = mp_dev();
    let mut c = d.client()?;
    expect_good(
        &past_ua(|| pr_out(&mut c, &dev, prout_sa::REGISTER, 0, &keys(KEY, 0)))?,
        "unregister on the map",
    )
}

/// Remove the registration of one path's I_T nexus only, directly on that
/// path with sg_persist (as after a failover that went wrong).
fn unregister_path(path: &Path) -> TestResult {
    sg_persist(
        &[
            "--out",
            "--register",
            &format!("--param-rk={KEY:#x}"),
            "--param-sark=0",
        ],
        path,
    )?;
    Ok(())
}

fn ops_status_consistent_map() -> TestResult {
    let d = reservd("reservd-ops", &[])?;
    registered_map(&d)?;
    let (p1, p2) = mp_paths();
    let dev = mp_dev();
    let o = reservdctl(&["status", dev.to_str().unwrap()], Stdio::null())?;
    let t = stdout(&o);
    check!(o.status.code() == Some(0), "exit status {}", o.status);
    let alias = env("RESERVD_MP_ALIAS");
    let wwid = env("RESERVD_MP_WWID");
    check!(
        t.contains(&format!("multipath map {alias}")) && t.contains(&wwid),
        "map name and WWID: {t}"
    );
    check!(
        t.contains(&format!("multipathd: key for this map {KEY:#x}")),
        "multipathd's key: {t}"
    );
    for p in [&p1, &p2] {
        check!(
            t.contains(&format!("path {} (", name(p))),
            "path {} listed",
            name(p)
        );
    }
    check!(
        t.matches(&format!("registered through this path: {KEY:#x}"))
            .count()
            == 2,
        "both paths carry the key"
    );
    check!(
        t.contains(&format!(
            "Verdict: consistent: key(s) {KEY:#x} registered on all 2 usable path(s)"
        )),
        "verdict"
    );
    // The same through the map's dm node, a path, and as JSON.
    let o = reservdctl(&["status", &env("RESERVD_MP_DM"), "--json"], Stdio::null())?;
    let j = stdout(&o);
    check!(o.status.code() == Some(0), "exit status {}", o.status);
    check!(
        j.contains(&format!("\"map\":\"{alias}\""))
            && j.contains(&format!(
                "\"verdict\":{{\"consistent\":true,\"keys\":[\"{KEY:#x}\"],\"missing\":[]"
            ))
            && j.contains(&format!("\"multipathd_key\":\"{KEY:#x}\"")),
        "JSON: {j}"
    );
    let o = reservdctl(&["status", p2.to_str().unwrap()], Stdio::null())?;
    check!(
        o.status.code() == Some(0) && stdout(&o).contains(&format!("multipath map {alias}")),
        "a path stands for its map"
    );
    unregister_map(&d)
}

fn ops_status_path_lost_its_key_and_repair() -> TestResult {
    let d = reservd("reservd-ops", &[])?;
    registered_map(&d)?;
    let (p1, p2) = mp_paths();
    let dev = mp_dev();
    // Path 2's I_T nexus loses its registration (as after a failover that
    // went wrong); path 1 keeps its own.
    unregister_path(&p2)?;
    check!(
        device_keys(&p1)? == vec![KEY],
        "one registration left: {:x?}",
        device_keys(&p1)?
    );
    let o = reservdctl(&["status", dev.to_str().unwrap()], Stdio::null())?;
    let t = stdout(&o);
    check!(o.status.code() == Some(5), "exit status {}", o.status);
    check!(
        t.contains(&format!(
            "Verdict: INCONSISTENT\n  path {} lacks key {KEY:#x}",
            name(&p2)
        )),
        "verdict names path 2"
    );
    check!(
        !t.contains(&format!("path {} lacks", name(&p1))),
        "path 1 is not blamed"
    );
    // Without --yes and without a terminal: refused, nothing changes.
    let o = reservdctl(
        &["status", "--repair", dev.to_str().unwrap()],
        Stdio::null(),
    )?;
    check!(o.status.code() == Some(1), "exit status {}", o.status);
    check!(
        String::from_utf8_lossy(&o.stderr).contains("--yes"),
        "refusal names --yes"
    );
    check!(device_keys(&p1)? == vec![KEY], "nothing repaired");
    // Repair.
    let o = reservdctl(
        &["status", "--repair", "--yes", dev.to_str().unwrap()],
        Stdio::null(),
    )?;
    let t = stdout(&o);
    check!(o.status.code() == Some(0), "exit status {}", o.status);
    check!(
        t.contains(&format!(
            "service action key {KEY:#x} on /dev/mapper/{}",
            env("RESERVD_MP_ALIAS")
        )) && t.contains(&format!("on path(s) {}", name(&p2))),
        "the plan is printed"
    );
    let after = t.split("After the repair:").nth(1).unwrap_or("");
    check!(
        after.contains("Verdict: consistent"),
        "verdict after the repair"
    );
    check!(
        device_keys(&p1)? == vec![KEY, KEY],
        "both nexuses registered again: {:x?}",
        device_keys(&p1)?
    );
    // The same as one JSON document: refused without --yes, then done.
    unregister_path(&p2)?;
    let o = reservdctl(
        &["status", "--repair", "--json", dev.to_str().unwrap()],
        Stdio::null(),
    )?;
    check!(o.status.code() == Some(1), "exit status {}", o.status);
    check!(
        String::from_utf8_lossy(&o.stderr).contains("--yes") && stdout(&o).is_empty(),
        "JSON refusal names --yes and prints nothing"
    );
    check!(device_keys(&p1)? == vec![KEY], "nothing repaired");
    let o = reservdctl(
        &[
            "status",
            "--repair",
            "--yes",
            "--json",
            dev.to_str().unwrap(),
        ],
        Stdio::null(),
    )?;
    let j = stdout(&o);
    check!(o.status.code() == Some(0), "exit status {}", o.status);
    let (before, after) = j.split_once("\"repair\":").unwrap_or(("", ""));
    check!(
        j.trim_end().lines().count() == 1
            && before.starts_with("{\"before\":{")
            && before.contains("\"consistent\":false")
            && after.starts_with(&format!(
                "{{\"needed\":true,\"map\":\"/dev/mapper/{}\",\"key\":\"{KEY:#x}\",\
                 \"aptpl\":false,\"paths\":[\"{}\"]}},\"after\":{{",
                env("RESERVD_MP_ALIAS"),
                name(&p2)
            ))
            && after.contains("\"consistent\":true"),
        "JSON repair: {j}"
    );
    check!(
        device_keys(&p1)? == vec![KEY, KEY],
        "both nexuses registered again: {:x?}",
        device_keys(&p1)?
    );
    // Path 2's nexus holds the key: RESERVE through it directly works.
    let mut c = d.client()?;
    expect_good(
        &past_ua(|| pr_out(&mut c, &p2, prout_sa::RESERVE, 1, &keys(KEY, 0)))?,
        "RESERVE through path 2 after the repair",
    )?;
    expect_good(
        &pr_out(&mut c, &p2, prout_sa::RELEASE, 1, &keys(KEY, 0))?,
        "RELEASE through path 2",
    )?;
    unregister_map(&d)
}

fn ops_check_all_good() -> TestResult {
    let d = reservd("reservd-ops", &["--enable-cleanup"])?;
    let o = reservdctl(&["-k", d.socket.to_str().unwrap(), "check"], Stdio::null())?;
    let t = stdout(&o);
    check!(o.status.code() == Some(0), "exit status {}", o.status);
    for want in [
        "ok: /dev/mapper/control usable",
        "ok: libmpathpersist loadable",
        "ok: multipathd reachable",
        "ok: reservation_key file configured",
        "ok: capabilities reservd keeps are available: CAP_SYS_RAWIO, CAP_SYS_ADMIN",
        "handshake ok, features 0x00000001 (CLEANUP)",
        "All good.",
    ] {
        check!(t.contains(want), "'{want}' missing");
    }
    // The release, and what reservd does itself for it: before 0.13 the
    // library's RELEASE and self-PREEMPT would break the map's one nexus.
    let line = t
        .lines()
        .find(|l| l.starts_with("ok: multipath-tools "))
        .ok_or("no line naming the multipath-tools release")?;
    let version: Vec<u32> = line["ok: multipath-tools ".len()..]
        .split(':')
        .next()
        .unwrap_or("")
        .split('.')
        .filter_map(|n| n.parse().ok())
        .collect();
    check!(version.len() == 3, "no version in '{line}'");
    if version < vec![0, 13, 0] {
        check!(
            line.contains("where this libmpathpersist would not: RELEASE runs on every path")
                && line.contains("registers the key again on the map's other paths"),
            "fixes for {version:?}: '{line}'"
        );
    } else {
        check!(
            line.contains("keeps a map one I_T nexus for RELEASE and PREEMPT"),
            "{version:?}: '{line}'"
        );
    }
    // A socket nobody listens on is a problem, with its fix.
    let o = reservdctl(&["-k", "/run/reservd-nobody.sock", "check"], Stdio::null())?;
    check!(o.status.code() == Some(5), "exit status {}", o.status);
    check!(
        stdout(&o).contains("PROBLEM: reservd socket /run/reservd-nobody.sock unusable")
            && stdout(&o).contains("fix: start reservd"),
        "socket problem"
    );
    Ok(())
}

/// The audit lines of reservd's log, once `n` of them are there.
fn audit_lines(log: &Path, n: usize) -> Result<Vec<String>, String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let lines: Vec<String> = text
            .lines()
            .filter(|l| l.contains("audit: "))
            .map(String::from)
            .collect();
        if lines.len() >= n || Instant::now() > deadline {
            return Ok(lines);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ops_audit_trail() -> TestResult {
    let dev = mp_dev();
    let sp = PathBuf::from(env("RESERVD_SP_DEV"));
    let d = reservd("reservd-ops-audit", &[])?;
    let mut c = d.client()?;
    // Settle pending unit attentions with PR IN, which is not audited.
    let _ = past_ua(|| pr_in(&mut c, &dev, prin_sa::READ_KEYS, 8192))?;
    let _ = past_ua(|| pr_in(&mut c, &sp, prin_sa::READ_KEYS, 8192))?;
    let steps: [(&str, u8, u8, u64, u64); 4] = [
        ("REGISTER", prout_sa::REGISTER, 0, 0, KEY),
        ("RESERVE", prout_sa::RESERVE, 5, KEY, 0),
        ("RELEASE", prout_sa::RELEASE, 5, KEY, 0),
        ("REGISTER", prout_sa::REGISTER, 0, KEY, 0),
    ];
    for (what, sa, ty, k, sk) in steps {
        expect_good(&pr_out(&mut c, &dev, sa, ty, &keys(k, sk))?, what)?;
        let _ = pr_in(&mut c, &dev, prin_sa::READ_RESERVATION, 8192)?;
    }
    // A refused command on the single-path disk (SG_IO backend).
    let r = pr_out(&mut c, &sp, prout_sa::REGISTER, 0, &keys(0x5ad, 0x5ae))?;
    check!(
        r.status.0 == 0x18,
        "REGISTER with a wrong key: {}",
        r.status.0
    );

    let lines = audit_lines(&d.log, 5)?;
    for l in &lines {
        println!("    | {l}");
    }
    check!(lines.len() == 5, "{} audit lines, want 5", lines.len());
    let pid = std::process::id();
    let dm = std::fs::metadata(&dev).map_err(|e| e.to_string())?;
    let devno = {
        use std::os::unix::fs::MetadataExt;
        format!("{}:{}", libc::major(dm.rdev()), libc::minor(dm.rdev()))
    };
    let common = format!(
        "device={devno} wwid={} map={} ",
        env("RESERVD_MP_WWID"),
        env("RESERVD_MP_ALIAS")
    );
    for (l, (what, _, ty, k, sk)) in lines.iter().zip(steps) {
        let want = format!(
            "audit: PR OUT {what} {common}type={ty} key={k:#x} sa_key={sk:#x} status=GOOD \
             sense=- backend=multipath peer_pid={pid} peer_uid=0"
        );
        check!(l.ends_with(&want), "line '{l}' != '...{want}'");
    }
    let l = &lines[4];
    check!(
        l.contains("audit: PR OUT REGISTER device=")
            && l.contains(&format!(
                "key=0x5ad sa_key=0x5ae status=RESERVATION_CONFLICT sense=- backend=sgio peer_pid={pid}"
            ))
            && !l.contains("map=mpath"),
        "single-path line: {l}"
    );
    // The disk outside multipath carries the WWID multipath would give it,
    // here and in `reservdctl status`, so one search finds the LU.
    let sp_wwid = env("RESERVD_SP_WWID");
    check!(
        l.contains(&format!(" wwid={sp_wwid} ")),
        "single-path line without wwid={sp_wwid}: {l}"
    );
    let o = reservdctl(&["status", sp.to_str().unwrap()], Stdio::null())?;
    check!(
        stdout(&o).contains(&format!("WWID {sp_wwid}")),
        "status of the single-path disk without WWID {sp_wwid}: {}",
        stdout(&o)
    );
    // -q silences the audit trail.
    drop(c);
    let q = reservd("reservd-ops-quiet", &["-q"])?;
    let mut c = q.client()?;
    let _ = pr_out(&mut c, &sp, prout_sa::REGISTER, 0, &keys(0x5ad, 0x5ae))?;
    // The log line is written before the answer: nothing to wait for.
    check!(audit_lines(&q.log, 0)?.is_empty(), "audit lines with -q");
    Ok(())
}

fn ops_status_offline_path_is_not_counted() -> TestResult {
    let d = reservd("reservd-ops", &[])?;
    registered_map(&d)?;
    let (_, p2) = mp_paths();
    let dev = mp_dev();
    unregister_path(&p2)?;
    let state = PathBuf::from(format!("/sys/block/{}/device/state", name(&p2)));
    std::fs::write(&state, "offline\n").map_err(|e| format!("{}: {e}", state.display()))?;
    let o = reservdctl(&["status", dev.to_str().unwrap()], Stdio::null());
    std::fs::write(&state, "running\n").map_err(|e| format!("{}: {e}", state.display()))?;
    let o = o?;
    let t = stdout(&o);
    check!(o.status.code() == Some(0), "exit status {}", o.status);
    check!(
        t.contains(&format!("path {} (", name(&p2)))
            && t.contains("state offline")
            && t.contains("(not usable)"),
        "the offline path is listed as not usable"
    );
    check!(
        t.contains(&format!(
            "Verdict: consistent: key(s) {KEY:#x} registered on all 1 usable path(s) (not counted: {})",
            name(&p2)
        )),
        "verdict"
    );
    Ok(())
}

/// The map's LU empty (CLEAR through reservd) and multipathd without a key
/// for the map, as before it goes live.
fn clean_map(c: &mut reservd_client::client::Client) -> TestResult {
    use reservd_daemon::backend::multipath::multipathd::{clear_map_keys, Multipathd};
    use std::os::unix::fs::MetadataExt;
    reset_lun(c, &mp_dev())?;
    let dm = std::fs::metadata(env("RESERVD_MP_DM")).map_err(|e| e.to_string())?;
    let minor = libc::minor(dm.rdev());
    let mut conn = Multipathd::from_env()
        .with_timeout(Duration::from_secs(20))
        .connect()
        .map_err(|e| format!("multipathd: {e}"))?;
    clear_map_keys(&mut conn, minor).map_err(|e| format!("multipathd: {e}"))?;
    check!(map_key()?.is_none(), "multipathd keeps a key for the map");
    Ok(())
}

/// The key multipathd holds for the map.
fn map_key() -> Result<Option<u64>, String> {
    use reservd_daemon::backend::multipath::multipathd::Multipathd;
    let r = Multipathd::from_env()
        .with_timeout(Duration::from_secs(20))
        .connect()
        .and_then(|mut c| c.command(&format!("getprkey map {}", env("RESERVD_MP_ALIAS"))))
        .map_err(|e| format!("multipathd: {e}"))?;
    reservd_client::pathcheck::parse_getprkey(&r)
}

/// The samples on reservd's metrics socket.
fn metrics(socket: &Path) -> Result<Vec<reservd_client::metrics::Sample>, String> {
    let text = reservd_client::metrics::fetch(socket, Duration::from_secs(10))
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    reservd_client::metrics::parse(&text)
}

/// The value of `name` with `labels`, summed over the samples that have
/// them.
fn value(s: &[reservd_client::metrics::Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    reservd_client::metrics::sum(s, name, labels)
}

/// reservd with its metrics on a socket and in a file: a few commands on
/// the map give exactly those counts, the verdict after each PR OUT says
/// whether every path holds the map's key, and the file has what the
/// socket has.
fn ops_metrics_count_the_commands_on_the_map() -> TestResult {
    let dir = Scratch::new("metrics")?;
    let msock = dir.join("m.sock");
    let file = dir.join("reservd.prom");
    let d = reservd(
        "reservd-ops-metrics",
        &[
            "--metrics-socket",
            msock.to_str().unwrap(),
            "--metrics-file",
            file.to_str().unwrap(),
            "--metrics-interval",
            "1",
        ],
    )?;
    let dev = mp_dev();
    let (p1, p2) = mp_paths();
    let alias = env("RESERVD_MP_ALIAS");
    let wwid = env("RESERVD_MP_WWID");
    let mut c = d.client()?;
    clean_map(&mut c)?;
    // Unit attentions settled: each command below is sent once.
    let _ = past_ua(|| pr_in(&mut c, &dev, prin_sa::READ_KEYS, 8192))?;
    let before = metrics(&msock)?;
    for _ in 0..3 {
        expect_good(&pr_in(&mut c, &dev, prin_sa::READ_KEYS, 8192)?, "READ KEYS")?;
    }
    expect_good(
        &pr_out(&mut c, &dev, prout_sa::REGISTER, 0, &keys(0, KEY))?,
        "REGISTER",
    )?;
    let map = [("map", alias.as_str()), ("wwid", wwid.as_str())];
    let gauges = |s: &[reservd_client::metrics::Sample]| {
        [
            "reservd_map_check_success",
            "reservd_map_active_paths",
            "reservd_map_registered",
            "reservd_map_key_registrations",
            "reservd_map_paths_lacking_key",
        ]
        .map(|n| value(s, n, &map))
    };
    let registered = metrics(&msock)?;
    check!(
        gauges(&registered) == [1.0, 2.0, 1.0, 2.0, 0.0],
        "after REGISTER: {:?}",
        gauges(&registered)
    );
    let took = value(&registered, "reservd_map_check_duration_seconds", &map);
    check!(
        took > 0.0 && took < 10.0,
        "the count after REGISTER took {took} s"
    );
    // Path 2's nexus loses its registration behind reservd's back; the
    // next PR OUT finds the map's key once for two paths. (A REGISTER
    // with a wrong key: reservd answers it without a command, which the
    // path without the key would refuse.)
    unregister_path(&p2)?;
    let r = pr_out(&mut c, &dev, prout_sa::REGISTER, 0, &keys(0x9999, 0x1111))?;
    check!(
        r.status.0 == 0x18,
        "REGISTER with a wrong key: {}",
        reservd_client::report::answer_text(&r)
    );
    let lacking = metrics(&msock)?;
    check!(
        gauges(&lacking) == [1.0, 2.0, 1.0, 1.0, 1.0],
        "after a PR OUT with path 2 unregistered: {:?}",
        gauges(&lacking)
    );
    // Back on path 2; reserve, release and unregister through reservd.
    sg_persist(
        &[
            "--out",
            "--register",
            "--param-rk=0",
            &format!("--param-sark={KEY:#x}"),
        ],
        &p2,
    )?;
    expect_good(
        &pr_out(&mut c, &dev, prout_sa::RESERVE, 5, &keys(KEY, 0))?,
        "RESERVE",
    )?;
    expect_good(
        &pr_out(&mut c, &dev, prout_sa::RELEASE, 5, &keys(KEY, 0))?,
        "RELEASE",
    )?;
    expect_good(
        &pr_out(&mut c, &dev, prout_sa::REGISTER, 0, &keys(KEY, 0))?,
        "unregister",
    )?;
    check!(device_keys(&p1)?.is_empty(), "keys left");
    let after = metrics(&msock)?;
    check!(
        gauges(&after) == [1.0, 2.0, 0.0, 0.0, 0.0],
        "after the unregistration: {:?}",
        gauges(&after)
    );
    let delta = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    let mp = ("backend", "multipath");
    let good = ("status", "GOOD");
    for (sa, want) in [
        ("READ_KEYS", 3.0),
        ("REGISTER", 2.0),
        ("RESERVE", 1.0),
        ("RELEASE", 1.0),
    ] {
        let got = delta(
            "reservd_commands_total",
            &[("service_action", sa), good, mp],
        );
        check!(got == want, "{sa}: {got} commands counted, {want} sent");
    }
    let conflicts = delta(
        "reservd_commands_total",
        &[
            ("service_action", "REGISTER"),
            ("status", "RESERVATION_CONFLICT"),
            mp,
        ],
    );
    check!(
        conflicts == 1.0,
        "{conflicts} conflicts counted, 1 answered"
    );
    check!(
        delta("reservd_commands_total", &[]) == 8.0,
        "8 commands in all: {}",
        delta("reservd_commands_total", &[])
    );
    check!(
        delta(
            "reservd_command_duration_seconds_count",
            &[("command", "PR_OUT"), mp]
        ) == 5.0,
        "5 PR OUT timed"
    );
    check!(
        delta(
            "reservd_multipath_library_calls_total",
            &[("call", "reserve_in")]
        ) == 0.0,
        "READ KEYS goes down the map, not through the library"
    );
    check!(
        delta("reservd_multipath_routes_total", &[]) == 5.0,
        "one route per PR OUT"
    );
    for (name, want) in [
        ("reservd_multipath_active", 1.0),
        ("reservd_connections_open", 1.0),
        ("reservd_commands_in_flight", 0.0),
        ("reservd_commands_hung", 0.0),
        ("reservd_connections_protocol_errors_total", 0.0),
    ] {
        check!(
            value(&after, name, &[]) == want,
            "{name}: {}",
            value(&after, name, &[])
        );
    }
    // reservdctl metrics shows the same, as text and as JSON.
    let sock = msock.to_str().unwrap();
    let o = reservdctl(&["metrics", "--metrics-socket", sock], Stdio::null())?;
    check!(o.status.code() == Some(0), "exit status {}", o.status);
    let text = stdout(&o);
    let rk = value(
        &after,
        "reservd_commands_total",
        &[("service_action", "READ_KEYS"), good, mp],
    );
    check!(
        text.contains(&format!(
            "reservd_commands_total{{command=\"PR_IN\",service_action=\"READ_KEYS\",\
             status=\"GOOD\",backend=\"multipath\"}} {rk}\n"
        )),
        "text: {text}"
    );
    let o = reservdctl(
        &["--json", "metrics", "--metrics-socket", sock],
        Stdio::null(),
    )?;
    let j: serde_json::Value =
        serde_json::from_str(&stdout(&o)).map_err(|e| format!("JSON: {e}"))?;
    check!(
        j.as_array().is_some_and(|a| a
            .iter()
            .any(|s| s["name"] == "reservd_map_paths_lacking_key"
                && s["labels"]["map"] == alias.as_str()
                && s["value"] == 0.0)),
        "JSON: {j}"
    );
    // The file has the same counts within an interval or two.
    let in_file = reservd_testkit::spawn::wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&file)
            .ok()
            .and_then(|t| reservd_client::metrics::parse(&t).ok())
            .is_some_and(|s| {
                value(&s, "reservd_commands_total", &[])
                    == value(&after, "reservd_commands_total", &[])
            })
    });
    check!(in_file, "the file: {:?}", std::fs::read_to_string(&file));
    drop(c);
    drop(d);
    check!(
        !file.exists() && !msock.exists(),
        "the metrics file and socket are removed at exit"
    );
    Ok(())
}

/// sg_persist on node 2's own nexus to the map's LU (past a unit
/// attention).
fn node2(args: &[&str]) -> Result<String, String> {
    let dev = PathBuf::from(env("RESERVD_N2_MP_DEV"));
    sg_persist(args, &dev).or_else(|_| sg_persist(args, &dev))
}

const NODE2_KEY: u64 = 0xb2;

fn validate_json(o: &Output) -> Result<serde_json::Value, String> {
    serde_json::from_str(&stdout(o)).map_err(|e| format!("JSON: {e}: {}", stdout(o)))
}

/// Nothing of a validate run left: no registration but `keys`, no
/// reservation but `reservation`, no key in multipathd, both paths in use.
fn left_as(keys: &[u64], reservation: Option<u64>) -> TestResult {
    let (p1, p2) = mp_paths();
    let mut k = device_keys(&p1)?;
    k.sort_unstable();
    check!(k == keys, "keys {k:x?}, want {keys:x?}");
    check!(
        device_reservation(&p1)?.map(|r| r.0) == reservation,
        "reservation {:?}",
        device_reservation(&p1)?
    );
    check!(map_key()?.is_none(), "multipathd holds a key for the map");
    for p in [&p1, &p2] {
        let state = std::fs::read_to_string(format!("/sys/block/{}/device/state", name(p)))
            .map_err(|e| e.to_string())?;
        check!(state.trim() == "running", "{}: {state}", name(p));
    }
    Ok(())
}

/// A map nobody uses passes every check, with and without a path
/// failing over, and is left as it was.
fn ops_validate_passes_on_a_clean_map() -> TestResult {
    let d = reservd("reservd-ops-validate", &[])?;
    let mut c = d.client()?;
    clean_map(&mut c)?;
    let sock = d.socket.to_str().unwrap().to_string();
    let dev = mp_dev();
    let dev = dev.to_str().unwrap();
    let o = reservdctl(&["-k", &sock, "validate", dev], Stdio::null())?;
    let t = stdout(&o);
    check!(o.status.code() == Some(0), "exit status {}", o.status);
    for name in reservd_client::validate::check_names(false) {
        check!(
            t.lines()
                .any(|l| l.starts_with("  PASS ") && l.contains(&format!(" {name} "))),
            "{name} passed"
        );
    }
    check!(
        t.contains(&format!(
            "Validating {dev} (map {}",
            env("RESERVD_MP_ALIAS")
        )) && t.ends_with("Verdict: PASSED (9 checks passed)\n"),
        "text"
    );
    left_as(&[], None)?;
    let (p1, _) = mp_paths();
    let o = reservdctl(
        &[
            "-k",
            &sock,
            "--json",
            "validate",
            dev,
            "--with-failover",
            "--failover-path",
            &name(&p1),
        ],
        Stdio::null(),
    )?;
    check!(o.status.code() == Some(0), "exit status {}", o.status);
    let j = validate_json(&o)?;
    let checks = j["checks"].as_array().ok_or("no checks")?;
    let names: Vec<&str> = checks.iter().filter_map(|c| c["name"].as_str()).collect();
    check!(
        names == reservd_client::validate::check_names(true),
        "checks {names:?}"
    );
    check!(
        checks.iter().all(|c| c["result"] == "pass") && j["verdict"] == "passed",
        "JSON: {j}"
    );
    check!(
        checks[8]["detail"].as_str().is_some_and(
            |d| d.starts_with(&format!("{} set offline; multipathd failed it", name(&p1)))
        ),
        "{}",
        checks[8]
    );
    left_as(&[], None)
}

/// A map another node registered and reserved is refused and left alone;
/// with its key expected and --force, the checks that touch no
/// reservation run, and its reservation stays.
fn ops_validate_refuses_a_map_another_node_holds() -> TestResult {
    let d = reservd("reservd-ops-validate", &[])?;
    let mut c = d.client()?;
    clean_map(&mut c)?;
    drop(c);
    node2(&[
        "--out",
        "--register",
        &format!("--param-sark={NODE2_KEY:#x}"),
    ])?;
    node2(&[
        "--out",
        "--reserve",
        &format!("--param-rk={NODE2_KEY:#x}"),
        "--prout-type=5",
    ])?;
    let result = (|| -> TestResult {
        let sock = d.socket.to_str().unwrap().to_string();
        let dev = mp_dev();
        let dev = dev.to_str().unwrap();
        let o = reservdctl(
            &["-k", &sock, "validate", dev, "--with-failover"],
            Stdio::null(),
        )?;
        let t = stdout(&o);
        check!(o.status.code() == Some(6), "exit status {}", o.status);
        check!(
            t.contains("  REFUSED  preflight")
                && t.contains("nobody said to expect: 0xb2")
                && t.ends_with("Verdict: REFUSED (the LU is in use; nothing was changed)\n"),
            "text"
        );
        left_as(&[NODE2_KEY], Some(NODE2_KEY))?;
        let o = reservdctl(
            &[
                "-k",
                &sock,
                "--json",
                "validate",
                dev,
                "--expect-key",
                "0xb2",
            ],
            Stdio::null(),
        )?;
        check!(o.status.code() == Some(6), "exit status {}", o.status);
        let j = validate_json(&o)?;
        check!(
            j["verdict"] == "refused"
                && j["checks"][0]["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("holds a reservation (type 5, key 0xb2)")),
            "JSON: {j}"
        );
        let o = reservdctl(
            &[
                "-k",
                &sock,
                "--json",
                "validate",
                dev,
                "--expect-key",
                "0xb2",
                "--force",
            ],
            Stdio::null(),
        )?;
        check!(o.status.code() == Some(0), "exit status {}", o.status);
        let j = validate_json(&o)?;
        let results: Vec<(String, String)> = j["checks"]
            .as_array()
            .ok_or("no checks")?
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap_or("").to_string(),
                    c["result"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        for (n, r) in &results {
            let want = if n.contains("reserv") || n.contains("release") {
                "skip"
            } else {
                "pass"
            };
            check!(r == want, "{n}: {r}, want {want}");
        }
        left_as(&[NODE2_KEY], Some(NODE2_KEY))
    })();
    node2(&["--out", "--clear", &format!("--param-rk={NODE2_KEY:#x}")])?;
    result
}
