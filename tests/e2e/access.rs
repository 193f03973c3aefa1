//! Guest scenarios of the "access" group: reservd's seccomp allow-list on
//! a real dm-multipath stack, where libmpathpersist, libmultipath,
//! libdevmapper and libudev run inside the filter.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reservd_daemon::sandbox::seccomp::Mode;
use reservd_proto::cdb::{pr_type, prin_sa, prout_sa};
use reservd_proto::prin;

use super::Scenario;
use super::{
    device_keys, device_reservation, env, expect_good, keys, mp_paths, past_ua, pr_in, pr_out,
    reset_lun,
};
use super::{reservd, Daemon, TestResult};

pub fn scenarios() -> Vec<Scenario> {
    vec![
        (
            "access_multipath_under_seccomp_enforce",
            access_multipath_under_seccomp_enforce,
        ),
        (
            "access_seccomp_log_records_a_refused_call",
            access_seccomp_log_records_a_refused_call,
        ),
        (
            "access_multipath_makes_no_call_outside_the_allow_list",
            access_multipath_makes_no_call_outside_the_allow_list,
        ),
    ]
}

const KEY: u64 = 0xacce_5500_0000_0001;

/// `Seccomp:` of every thread of `pid` (2 = filter).
fn seccomp_of_threads(pid: u32) -> Result<Vec<String>, String> {
    let dir = format!("/proc/{pid}/task");
    let mut out = Vec::new();
    for t in std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))? {
        let p = t.map_err(|e| e.to_string())?.path().join("status");
        let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        let v = text
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .ok_or("no Seccomp: line")?;
        out.push(v.trim().to_string());
    }
    Ok(out)
}

/// REGISTER, READ KEYS (through reservd and on each path with sg_persist),
/// RESERVE, READ RESERVATION, REPORT CAPABILITIES, READ FULL STATUS,
/// RELEASE, unregister, on the multipath map.
fn register_read_keys_unregister(d: &Daemon, dev: &Path) -> TestResult {
    let (p1, p2) = mp_paths();
    let mut c = d.client()?;
    reset_lun(&mut c, dev)?;
    let r = past_ua(|| pr_out(&mut c, dev, prout_sa::REGISTER, 0, &keys(0, KEY)))?;
    expect_good(&r, "REGISTER on the map")?;
    let r = past_ua(|| pr_in(&mut c, dev, prin_sa::READ_KEYS, 8192))?;
    expect_good(&r, "READ KEYS on the map")?;
    let (_, k, _) = prin::parse_read_keys(&r.data).map_err(|_| "short READ KEYS")?;
    // One registration per path (I_T nexus) on the device; the map lists
    // its registration once, as one nexus.
    check_eq!(k, vec![KEY], "READ KEYS through reservd");
    check_eq!(device_keys(&p1)?, vec![KEY, KEY], "keys on path 1");
    check_eq!(device_keys(&p2)?, vec![KEY, KEY], "keys on path 2");
    let r = past_ua(|| {
        pr_out(
            &mut c,
            dev,
            prout_sa::RESERVE,
            pr_type::WRITE_EXCLUSIVE,
            &keys(KEY, 0),
        )
    })?;
    expect_good(&r, "RESERVE on the map")?;
    check_eq!(
        device_reservation(&p1)?.map(|(k, _)| k),
        Some(KEY),
        "reservation on path 1"
    );
    for sa in [
        prin_sa::READ_RESERVATION,
        prin_sa::REPORT_CAPABILITIES,
        prin_sa::READ_FULL_STATUS,
    ] {
        let r = past_ua(|| pr_in(&mut c, dev, sa, 8192))?;
        expect_good(&r, &format!("PR IN service action {sa} on the map"))?;
    }
    let r = past_ua(|| {
        pr_out(
            &mut c,
            dev,
            prout_sa::RELEASE,
            pr_type::WRITE_EXCLUSIVE,
            &keys(KEY, 0),
        )
    })?;
    expect_good(&r, "RELEASE on the map")?;
    check_eq!(device_reservation(&p1)?, None, "reservation after RELEASE");
    let r = past_ua(|| pr_out(&mut c, dev, prout_sa::REGISTER, 0, &keys(KEY, 0)))?;
    expect_good(&r, "unregister on the map")?;
    check_eq!(
        device_keys(&p1)?,
        Vec::<u64>::new(),
        "keys after unregister"
    );
    Ok(())
}

/// libmpathpersist's path checker for the LIO paths, selected for the
/// reservd started next: `tur` as the test bed's multipath.conf has it,
/// or `directio` (the default for LIO from multipath-tools 0.9.5 on,
/// which needs Linux AIO under reservd's filter; `detect_checker no`, or
/// 0.9.4 picks tur for ALUA devices whatever is set) with a `conf.d` entry that
/// only libraries initialised while it exists read (multipathd read its
/// configuration at start). Removed when dropped.
struct Checker {
    name: &'static str,
    file: Option<PathBuf>,
}

impl Checker {
    const ALL: [&'static str; 2] = ["tur", "directio"];

    fn select(name: &'static str) -> Result<Checker, String> {
        if name == "tur" {
            return Ok(Checker { name, file: None });
        }
        let dir = Path::new("/etc/multipath/conf.d");
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let file = dir.join("zz-reservd-access-checker.conf");
        let text = format!(
            "devices {{\n    device {{\n        vendor \"LIO-ORG\"\n        product \".*\"\n        \
             path_checker {name}\n        detect_checker no\n    }}\n}}\n"
        );
        std::fs::write(&file, text).map_err(|e| format!("{}: {e}", file.display()))?;
        Ok(Checker {
            name,
            file: Some(file),
        })
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        if let Some(f) = &self.file {
            let _ = std::fs::remove_file(f);
        }
    }
}

fn access_multipath_under_seccomp_enforce() -> TestResult {
    for name in Checker::ALL {
        let checker = Checker::select(name)?;
        multipath_under_seccomp_enforce(checker.name)
            .map_err(|e| format!("path checker {}: {e}", checker.name))?;
    }
    Ok(())
}

fn multipath_under_seccomp_enforce(checker: &str) -> TestResult {
    let dev = PathBuf::from(env("RESERVD_MP_DEV"));
    let d = reservd("reservd-access-enforce", &["--seccomp=enforce", "-vv"])?;
    let log = std::fs::read_to_string(&d.log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut log = log;
    while !log.contains("multipath support: active") {
        check!(
            Instant::now() < deadline,
            "multipath support not active: {log}"
        );
        std::thread::sleep(Duration::from_millis(20));
        log = std::fs::read_to_string(&d.log).unwrap_or_default();
    }
    register_read_keys_unregister(&d, &dev)?;
    // libmultipath says which checker it selected for each path (at
    // verbosity 3, which -vv gives it).
    let log = std::fs::read_to_string(&d.log).unwrap_or_default();
    let selected: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("path_checker = "))
        .collect();
    check!(
        !selected.is_empty()
            && selected
                .iter()
                .all(|l| l.contains(&format!("= {checker} "))),
        "libmultipath's checker selections: {selected:?}"
    );
    // Every thread, the per-path threads' parents included, is filtered.
    let s = seccomp_of_threads(d.pid())?;
    check!(
        !s.is_empty() && s.iter().all(|v| v == "2"),
        "Seccomp: of the threads: {s:?}"
    );
    Ok(())
}

/// Kernel log records of seccomp's "log" action (audit type 1326) for
/// process `pid`: the syscall numbers.
fn logged_syscalls(pid: u32) -> Result<Vec<String>, String> {
    let out = std::process::Command::new("dmesg")
        .output()
        .map_err(|e| format!("dmesg: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let needle = format!(" pid={pid} ");
    Ok(text
        .lines()
        .filter(|l| l.contains("type=1326") && l.contains(&needle))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("syscall="))
                .map(str::to_string)
        })
        .collect())
}

/// The detection below is not vacuous: a call outside the list made under
/// the "log" filter shows up in the kernel log.
#[allow(unsafe_code)] // prctl and a raw socket, under the log filter
fn access_seccomp_log_records_a_refused_call() -> TestResult {
    let pid = std::process::id();
    let r = std::thread::spawn(move || -> Result<i32, String> {
        // SAFETY: prctl with integer arguments.
        let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        if r != 0 {
            return Err("PR_SET_NO_NEW_PRIVS failed".into());
        }
        reservd_daemon::sandbox::seccomp::install_this_thread(Mode::Log, pid)
            .map_err(|e| format!("{e:#}"))?;
        // SAFETY: socket() with integer arguments; the fd is closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        if fd >= 0 {
            // SAFETY: fd is the socket just created, closed once.
            unsafe { libc::close(fd) };
        }
        Ok(fd)
    })
    .join()
    .map_err(|_| "thread panicked")??;
    check!(r >= 0, "socket(AF_INET) refused under the log filter");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let calls = logged_syscalls(pid)?;
        if calls.iter().any(|c| c == &libc::SYS_socket.to_string()) {
            return Ok(());
        }
        check!(
            Instant::now() < deadline,
            "no audit record of socket() for pid {pid}: {calls:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// With --seccomp=log, the multipath sequence makes no call the filter
/// would refuse (the kernel logs none for reservd's pid).
fn access_multipath_makes_no_call_outside_the_allow_list() -> TestResult {
    for name in Checker::ALL {
        let checker = Checker::select(name)?;
        multipath_makes_no_call_outside_the_allow_list()
            .map_err(|e| format!("path checker {}: {e}", checker.name))?;
    }
    Ok(())
}

fn multipath_makes_no_call_outside_the_allow_list() -> TestResult {
    let dev = PathBuf::from(env("RESERVD_MP_DEV"));
    let mut d = reservd("reservd-access-log", &["--seccomp=log", "-v"])?;
    let pid = d.pid();
    std::thread::sleep(Duration::from_millis(200));
    register_read_keys_unregister(&d, &dev)?;
    let status = d.stop();
    check!(
        status.is_some_and(|s| s.success()),
        "reservd exit: {status:?}"
    );
    // Give kauditd a moment to print.
    std::thread::sleep(Duration::from_millis(300));
    let calls = logged_syscalls(pid)?;
    check!(
        calls.is_empty(),
        "system calls outside the allow-list (x86_64 numbers): {calls:?}"
    );
    Ok(())
}
