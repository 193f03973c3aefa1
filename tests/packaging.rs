//! The Debian and RPM packages and the systemd units they ship.
//!
//! The package tests build both packages from this tree with
//! `packaging/build-deb.sh` and `packaging/build-rpm.sh` (one compilation,
//! shared through target/), install the .deb on this machine beside
//! `qemu-system-common`, and remove and purge it again, so they need root,
//! dpkg-dev, debhelper, rpm and lintian. Whatever happens, the machine is left
//! without reservd installed, enabled or diverted.

use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use reservd_testkit::spawn::{Daemon, Ready};

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn packages_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    root().join(target).join("packages")
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `cmd`, panics with its output unless it succeeds, returns stdout.
fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Runs a dpkg command that changes the database, waiting while another
/// process (apt, another dpkg) holds the dpkg lock, as apt's
/// DPkg::Lock::Timeout does.
fn dpkg_locked(program: &str, args: &[&str]) -> Output {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let out = run(Command::new(program).args(args));
        let locked = text(&out.stderr).contains("lock");
        if out.status.success() || !locked || Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// [`dpkg_locked`], which must succeed.
fn dpkg_ok(program: &str, args: &[&str]) {
    let out = dpkg_locked(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Package builds one at a time: the second reuses the first's compilation.
static BUILD: Mutex<()> = Mutex::new(());

struct Built {
    path: PathBuf,
    log: String,
}

fn build(script: &str, lintian: bool) -> Built {
    let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let out = run(Command::new(root().join(script))
        .current_dir(root())
        .env("RESERVD_LINTIAN", if lintian { "1" } else { "0" }));
    let log = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{script} failed:\n{log}");
    let path = PathBuf::from(text(&out.stdout).lines().last().unwrap_or("").trim());
    assert!(path.is_file(), "{script} named no package: {path:?}\n{log}");
    assert_eq!(
        path.parent().and_then(|p| p.canonicalize().ok()),
        packages_dir().canonicalize().ok(),
        "packages go to target/packages"
    );
    eprintln!(
        "{script}: {} in {:.1} s",
        path.display(),
        started.elapsed().as_secs_f64()
    );
    Built { path, log }
}

fn deb() -> &'static Built {
    static DEB: OnceLock<Built> = OnceLock::new();
    DEB.get_or_init(|| build("packaging/build-deb.sh", false))
}

fn rpm() -> &'static Built {
    static RPM: OnceLock<Built> = OnceLock::new();
    RPM.get_or_init(|| {
        // The .deb first, so that the RPM build finds the binaries built.
        deb();
        build("packaging/build-rpm.sh", false)
    })
}

fn tree_docs() -> Vec<String> {
    let mut docs = vec!["README.md".to_string()];
    if let Ok(rd) = std::fs::read_dir(root().join("docs")) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".md") {
                docs.push(name);
            }
        }
    }
    docs
}

/// The files `make install` puts into both packages, as installed by the
/// .deb (Debian 12 keeps units in /lib/systemd/system).
fn expected_deb_files() -> BTreeSet<String> {
    let mut files: BTreeSet<String> = [
        "/usr/bin/reservd",
        "/usr/bin/reservdctl",
        "/lib/systemd/system/reservd.socket",
        "/lib/systemd/system/reservd.service",
        "/usr/share/man/man8/reservd.8.gz",
        "/usr/share/bash-completion/completions/reservd",
        "/usr/share/zsh/vendor-completions/_reservd",
        "/usr/share/fish/vendor_completions.d/reservd.fish",
        "/usr/share/bash-completion/completions/reservdctl",
        "/usr/share/zsh/vendor-completions/_reservdctl",
        "/usr/share/fish/vendor_completions.d/reservdctl.fish",
        "/usr/share/doc/reservd/copyright",
        "/usr/share/doc/reservd/changelog.gz",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    for page in ["", "-in", "-out", "-raw", "-status", "-check"] {
        files.insert(format!("/usr/share/man/man8/reservdctl{page}.8.gz"));
    }
    for d in tree_docs() {
        files.insert(format!("/usr/share/doc/reservd/{d}"));
    }
    files
}

/// Regular files in a .deb, as absolute paths.
fn deb_payload(deb: &Path) -> BTreeSet<String> {
    ok(Command::new("dpkg-deb").arg("-c").arg(deb))
        .lines()
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches('.').to_string())
        .collect()
}

/// Regular files in an .rpm.
fn rpm_payload(rpm: &Path) -> BTreeSet<String> {
    ok(Command::new("rpm")
        .args(["-qp", "--qf", "[%{FILEMODES:perms} %{FILENAMES}\\n]"])
        .arg(rpm))
    .lines()
    .filter(|l| l.starts_with('-'))
    .filter_map(|l| l.split_once(' ').map(|(_, p)| p.to_string()))
    .collect()
}

/// A payload path with the differences that belong to each format taken
/// out: compressed documentation (Debian compresses docs over 4 KiB), the
/// unit directory and the zsh completion directory.
fn normalise(p: &str) -> String {
    let p = p.strip_suffix(".gz").unwrap_or(p);
    let p = p.replace("/usr/lib/systemd/system/", "/lib/systemd/system/");
    p.replace("/zsh/site-functions/", "/zsh/vendor-completions/")
}

fn deb_compressed_doc(name: &str) -> bool {
    // debian/rules keeps the Markdown documentation uncompressed; anything
    // else over 4 KiB is compressed by debhelper.
    if name.ends_with(".md") {
        return false;
    }
    let size = std::fs::metadata(root().join("docs").join(name))
        .or_else(|_| std::fs::metadata(root().join(name)))
        .map(|m| m.len())
        .unwrap_or(0);
    size > 4096
}

fn is_installed(pkg: &str) -> bool {
    run(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .stdout
        .starts_with(b"install ok installed")
}

fn apt_install(pkg: &str) {
    if is_installed(pkg) {
        return;
    }
    let env = [("DEBIAN_FRONTEND", "noninteractive")];
    ok(Command::new("apt-get")
        .envs(env)
        .args(["-o", "DPkg::Lock::Timeout=600", "update", "-qq"]));
    ok(Command::new("apt-get").envs(env).args([
        "-o",
        "DPkg::Lock::Timeout=600",
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
        pkg,
    ]));
}

const DIVERTED: &str = "/usr/bin/qemu-pr-helper.qemu";

/// Puts the machine back as it was: no diversion of qemu-pr-helper, reservd
/// purged. Runs before the install test and when it ends, even by a panic.
fn clean_machine() {
    if Path::new(DIVERTED).exists() {
        let _ = std::fs::remove_file("/usr/bin/qemu-pr-helper");
        let _ = dpkg_locked(
            "dpkg-divert",
            &["--local", "--rename", "--remove", "/usr/bin/qemu-pr-helper"],
        );
    }
    if run(Command::new("dpkg-query").args(["-W", "reservd"]))
        .status
        .success()
    {
        let _ = dpkg_locked("dpkg", &["--purge", "reservd"]);
    }
}

struct CleanOnDrop;
impl Drop for CleanOnDrop {
    fn drop(&mut self) {
        clean_machine();
    }
}

fn reservd_links_in_etc() -> Vec<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            let ft = match e.file_type() {
                Ok(t) => t,
                Err(_) => continue,
            };
            if ft.is_dir() {
                walk(&p, found);
            } else if e.file_name().to_string_lossy().starts_with("reservd") {
                found.push(p);
            }
        }
    }
    let mut found = Vec::new();
    walk(Path::new("/etc/systemd/system"), &mut found);
    walk(
        Path::new("/var/lib/systemd/deb-systemd-helper-enabled"),
        &mut found,
    );
    found
}

#[test]
#[ignore = "needs root, dpkg-dev, debhelper, rpm, lintian; run by scripts/test.sh"]
fn deb_builds_and_lintian_reports_no_errors() {
    let deb = deb();
    assert_eq!(
        deb.path.file_name().unwrap().to_string_lossy(),
        format!(
            "reservd_{VERSION}_{}.deb",
            ok(Command::new("dpkg").arg("--print-architecture")).trim()
        )
    );
    let fields = ok(Command::new("dpkg-deb")
        .args(["-f"])
        .arg(&deb.path)
        .args(["Depends", "Recommends"]));
    assert!(fields.contains("libc6"), "shlibs missing: {fields}");
    assert!(
        fields.contains("Recommends: multipath-tools"),
        "multipath-tools is a run-time recommendation: {fields}"
    );
    let out = run(Command::new("lintian")
        .args(["--fail-on", "error", "--pedantic"])
        .arg(&deb.path));
    let report = text(&out.stdout);
    eprintln!("lintian:\n{report}{}", text(&out.stderr));
    let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{}", errors.join("\n"));
    assert!(out.status.success(), "lintian failed: {}", out.status);
}

#[test]
#[ignore = "needs root, dpkg-dev, debhelper, rpm, lintian; run by scripts/test.sh"]
fn deb_installs_beside_qemu_and_removes_cleanly() {
    let deb = deb();
    apt_install("qemu-system-common");
    apt_install("man-db");
    clean_machine();
    let _clean = CleanOnDrop;
    let qemu_helper_md5 = ok(Command::new("md5sum").arg("/usr/bin/qemu-pr-helper"));

    dpkg_ok("dpkg", &["-i", &deb.path.to_string_lossy()]);

    // The files, and none of them belongs to QEMU.
    let listed: BTreeSet<String> = ok(Command::new("dpkg").args(["-L", "reservd"]))
        .lines()
        .map(String::from)
        .collect();
    let listed_files: BTreeSet<String> = listed
        .iter()
        .filter(|p| Path::new(p).is_file())
        .cloned()
        .collect();
    let expected: BTreeSet<String> = expected_deb_files()
        .into_iter()
        .map(|p| {
            let name = p.rsplit('/').next().unwrap_or("");
            if p.starts_with("/usr/share/doc/reservd/") && deb_compressed_doc(name) {
                format!("{p}.gz")
            } else {
                p
            }
        })
        .collect();
    assert_eq!(listed_files, expected, "dpkg -L reservd");
    let qemu: BTreeSet<String> = ok(Command::new("dpkg").args(["-L", "qemu-system-common"]))
        .lines()
        .filter(|p| Path::new(p).is_file())
        .map(String::from)
        .collect();
    let shared: Vec<_> = qemu.intersection(&listed_files).collect();
    assert!(shared.is_empty(), "files of both packages: {shared:?}");
    assert!(
        ok(Command::new("dpkg").args(["-S", "/usr/bin/qemu-pr-helper"]))
            .starts_with("qemu-system-common:"),
        "qemu-pr-helper stays QEMU's"
    );

    // The installed programs run.
    let v = ok(Command::new("/usr/bin/reservd").arg("--version"));
    assert!(v.contains(VERSION), "reservd --version: {v}");
    let v = ok(Command::new("/usr/bin/reservdctl").arg("--version"));
    assert!(v.contains(VERSION), "reservdctl --version: {v}");
    let man = ok(Command::new("man").args(["-w", "8", "reservd"]));
    assert_eq!(man.trim(), "/usr/share/man/man8/reservd.8.gz");

    // The units as installed: valid, the socket enabled, the service not.
    let out = run(Command::new("systemd-analyze").args([
        "verify",
        "/lib/systemd/system/reservd.socket",
        "/lib/systemd/system/reservd.service",
    ]));
    let diag = text(&out.stderr);
    assert!(
        out.status.success() && !diag.contains("reservd"),
        "systemd-analyze verify: {}\n{diag}",
        out.status
    );
    let state = ok(Command::new("systemctl").args([
        "--root=/",
        "is-enabled",
        "reservd.socket",
        "reservd.service",
    ]));
    assert_eq!(
        state.lines().collect::<Vec<_>>(),
        ["enabled", "indirect"],
        "the socket is enabled, the service is started by it"
    );
    let link = std::fs::read_link("/etc/systemd/system/sockets.target.wants/reservd.socket")
        .expect("socket enabled in sockets.target");
    assert_eq!(link, Path::new("/lib/systemd/system/reservd.socket"));

    // docs/packaging.md's recipe: qemu-pr-helper resolves to reservd, and
    // undoing it gives QEMU's binary back unchanged.
    dpkg_ok(
        "dpkg-divert",
        &[
            "--local",
            "--rename",
            "--divert",
            DIVERTED,
            "--add",
            "/usr/bin/qemu-pr-helper",
        ],
    );
    std::os::unix::fs::symlink("reservd", "/usr/bin/qemu-pr-helper").expect("symlink");
    let v = ok(Command::new("qemu-pr-helper").arg("--version"));
    assert!(v.starts_with("reservd "), "qemu-pr-helper is reservd: {v}");
    let v = ok(Command::new(DIVERTED).arg("--version"));
    assert!(
        v.contains("QEMU") || v.contains("Debian"),
        "QEMU's helper kept: {v}"
    );
    std::fs::remove_file("/usr/bin/qemu-pr-helper").expect("remove symlink");
    dpkg_ok(
        "dpkg-divert",
        &["--local", "--rename", "--remove", "/usr/bin/qemu-pr-helper"],
    );
    assert_eq!(
        ok(Command::new("md5sum").arg("/usr/bin/qemu-pr-helper")),
        qemu_helper_md5
    );

    // Remove: the files go, the enablement stays until purge.
    dpkg_ok("dpkg", &["-r", "reservd"]);
    for f in &listed_files {
        assert!(!Path::new(f).exists(), "{f} left after dpkg -r");
    }
    dpkg_ok("dpkg", &["--purge", "reservd"]);
    assert!(!is_installed("reservd"));
    let left = reservd_links_in_etc();
    assert!(left.is_empty(), "left after purge: {left:?}");
    assert!(!Path::new("/usr/share/doc/reservd").exists());
    assert!(is_installed("qemu-system-common"));
    ok(Command::new("dpkg").args(["--verify", "qemu-system-common"]));
}

#[test]
#[ignore = "needs root, dpkg-dev, debhelper, rpm, lintian; run by scripts/test.sh"]
fn rpm_builds_with_the_same_payload_as_the_deb() {
    let deb = deb();
    let rpm = rpm();
    assert_eq!(
        rpm.path.file_name().unwrap().to_string_lossy(),
        format!(
            "reservd-{VERSION}-1.{}.rpm",
            ok(Command::new("uname").arg("-m")).trim()
        )
    );
    assert!(
        !rpm.log.contains("cargo build"),
        "the RPM build compiled reservd again:\n{}",
        rpm.log
    );

    let debian_only = [
        "/usr/share/doc/reservd/copyright",
        "/usr/share/doc/reservd/changelog",
    ];
    let from_deb: BTreeSet<String> = deb_payload(&deb.path)
        .iter()
        .map(|p| normalise(p))
        .filter(|p| !debian_only.contains(&p.as_str()))
        .collect();
    let from_rpm: BTreeSet<String> = rpm_payload(&rpm.path)
        .iter()
        .map(|p| normalise(p))
        .collect();
    assert_eq!(from_deb, from_rpm, "payload of the .deb vs the .rpm");
    assert!(from_rpm.contains("/lib/systemd/system/reservd.socket"));
    assert!(rpm_payload(&rpm.path).contains("/usr/share/zsh/site-functions/_reservd"));

    // Same install rule: the text files are byte for byte the same.
    let tmp = std::env::temp_dir().join(format!("reservd-pkgcmp-{}", std::process::id()));
    let (d, r) = (tmp.join("deb"), tmp.join("rpm"));
    std::fs::create_dir_all(&r).unwrap();
    ok(Command::new("dpkg-deb").arg("-x").arg(&deb.path).arg(&d));
    ok(Command::new("sh").current_dir(&r).arg("-c").arg(format!(
        "rpm2cpio '{}' | cpio -idm --quiet",
        rpm.path.display()
    )));
    let pairs = [
        (
            "lib/systemd/system/reservd.service",
            "usr/lib/systemd/system/reservd.service",
        ),
        (
            "lib/systemd/system/reservd.socket",
            "usr/lib/systemd/system/reservd.socket",
        ),
        (
            "usr/share/zsh/vendor-completions/_reservd",
            "usr/share/zsh/site-functions/_reservd",
        ),
        (
            "usr/share/bash-completion/completions/reservd",
            "usr/share/bash-completion/completions/reservd",
        ),
        (
            "usr/share/doc/reservd/README.md",
            "usr/share/doc/reservd/README.md",
        ),
    ];
    for (a, b) in pairs {
        let x = std::fs::read(d.join(a)).unwrap_or_else(|e| panic!("{a}: {e}"));
        let y = std::fs::read(r.join(b)).unwrap_or_else(|e| panic!("{b}: {e}"));
        assert!(x == y, "{a} differs between the packages");
    }
    let man = |p: PathBuf| ok(Command::new("zcat").arg(p));
    assert_eq!(
        man(d.join("usr/share/man/man8/reservd.8.gz")),
        man(r.join("usr/share/man/man8/reservd.8.gz"))
    );
    let _ = std::fs::remove_dir_all(&tmp);

    // Scriptlets: the socket follows the preset policy; erasing stops both.
    let scripts = ok(Command::new("rpm")
        .args(["-qp", "--scripts"])
        .arg(&rpm.path));
    assert!(scripts.contains("preset reservd.socket"), "{scripts}");
    assert!(
        scripts.contains("disable --now reservd.socket reservd.service"),
        "{scripts}"
    );
}

/// `Key=value` lines of a unit file (the last one wins, as for systemd's
/// single-valued settings; repeated keys are joined with a space).
fn unit(name: &str) -> Vec<(String, String)> {
    let path = root().join("packaging/systemd").join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn get<'a>(u: &'a [(String, String)], key: &str) -> Option<&'a str> {
    u.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[test]
fn units_listen_where_reservd_does_and_keep_devices_visible() {
    let socket = unit("reservd.socket");
    let listen = get(&socket, "ListenStream").expect("ListenStream");
    let default = reservd_daemon::start::listen::DEFAULT_SOCKET.replacen("/var/run/", "/run/", 1);
    assert_eq!(listen, default, "the socket unit and reservd's default");
    assert_eq!(get(&socket, "SocketMode"), Some("0600"));
    assert!(get(&socket, "Conflicts").is_some_and(|c| c.contains("qemu-pr-helper.socket")));
    assert_eq!(get(&socket, "WantedBy"), Some("sockets.target"));

    let service = unit("reservd.service");
    assert_eq!(get(&service, "Type"), Some("notify"));
    assert_eq!(get(&service, "ExecStart"), Some("/usr/bin/reservd"));
    assert_eq!(get(&service, "Requires"), Some("reservd.socket"));
    assert_eq!(
        get(&service, "CapabilityBoundingSet"),
        Some("CAP_SYS_RAWIO CAP_SYS_ADMIN")
    );
    assert_eq!(get(&service, "AmbientCapabilities"), Some(""));
    assert_eq!(get(&service, "RestrictAddressFamilies"), Some("AF_UNIX"));
    for (k, v) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("SystemCallArchitectures", "native"),
        ("Restart", "on-failure"),
    ] {
        assert_eq!(get(&service, k), Some(v), "{k}");
    }
    // reservd installs its own filter under systemd's: seccomp(2) is in
    // none of systemd's groups (the VM tier's systemd group starts the unit).
    assert!(
        get(&service, "SystemCallFilter")
            .is_some_and(|f| f.split_whitespace().any(|w| w == "seccomp")),
        "SystemCallFilter without seccomp: the service cannot start"
    );
    assert_eq!(get(&service, "WatchdogSec"), Some("30s"));
    // A conflict without an ordering lets systemd stop one socket while it
    // starts the other, and RemoveOnStop= can delete the other's path.
    let after = |u: &[(String, String)], what: &str| {
        u.iter()
            .any(|(k, v)| k == "After" && v.split_whitespace().any(|w| w == what))
    };
    assert!(after(&socket, "qemu-pr-helper.socket"));
    assert!(after(&service, "qemu-pr-helper.service"));
    // The metrics socket reservdctl reads by default is in the only
    // directory the service may write (ProtectSystem=strict).
    let metrics = Path::new(reservd_client::metrics::DEFAULT_SOCKET);
    assert_eq!(
        metrics.parent().and_then(|d| d.strip_prefix("/run").ok()),
        get(&service, "RuntimeDirectory").map(Path::new),
        "reservdctl metrics' default socket and the service's RuntimeDirectory="
    );
    // multipathd's abstract socket is in the host network namespace;
    // libmpathpersist opens /dev/mapper/control and the path devices.
    for k in [
        "PrivateNetwork",
        "PrivateDevices",
        "DevicePolicy",
        "DeviceAllow",
        "ProtectClock",
        "ProcSubset",
        "User",
        "DynamicUser",
        "PrivateUsers",
    ] {
        assert_eq!(get(&service, k), None, "{k}= would break reservd");
    }
}

#[test]
#[ignore = "needs systemd-analyze (systemd); run by scripts/test.sh"]
fn service_sandbox_exposure_stays_low() {
    let out = ok(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(root().join("packaging/systemd/reservd.service")));
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no overall exposure in:\n{out}"));
    let level: f64 = line
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read {line:?}"));
    eprintln!("{}", line.trim());
    assert!(
        level <= 3.0,
        "exposure {level} (docs/packaging.md says 2.3)"
    );
}

/// reservd under socket activation as reservd.service runs it: fd 3 from
/// systemd, READY=1 on NOTIFY_SOCKET once it accepts, and syslog priority
/// prefixes without timestamps when stderr is the journal.
#[test]
#[ignore = "needs systemd-socket-activate (systemd); run by scripts/test.sh"]
fn daemon_behaves_as_the_service_unit_expects() {
    let dir = std::env::temp_dir().join(format!("reservd-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("pr.sock");
    let notify_path = dir.join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let stderr_path = dir.join("stderr");
    // Its stderr is this file (the same inode, truncated again at start).
    let meta = std::fs::File::create(&stderr_path)
        .unwrap()
        .metadata()
        .unwrap();
    let journal_stream = format!("{}:{}", meta.dev(), meta.ino());

    // The first connection makes systemd-socket-activate exec reservd.
    let mut act = Command::new("systemd-socket-activate");
    act.arg("-l")
        .arg(&sock)
        .arg(format!("-ENOTIFY_SOCKET={}", notify_path.display()))
        .arg(format!("-EJOURNAL_STREAM={journal_stream}"))
        .args([env!("CARGO_BIN_EXE_reservd"), "-v"]);
    let mut daemon = Daemon::start(act, &sock, &stderr_path, Ready::Socket).unwrap();
    let conn = UnixStream::connect(&sock).expect("connect");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 256];
    let ready = loop {
        assert!(Instant::now() < deadline, "no READY=1 from reservd");
        if let Ok(n) = notify.recv(&mut buf) {
            break text(&buf[..n]);
        }
    };
    assert!(ready.lines().any(|l| l == "READY=1"), "notify: {ready:?}");
    // reservd serves the activated socket: the helper speaks first, with
    // its feature word (no extension offered by default).
    let mut conn = conn;
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut features = [0xffu8; 4];
    conn.read_exact(&mut features)
        .expect("handshake on the socket-activated fd");
    assert_eq!(features, [0, 0, 0, 0]);
    drop(conn);
    let status = daemon.stop().expect("reservd was running");
    let log = std::fs::read_to_string(&stderr_path).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(status.success(), "reservd exit {status}; log:\n{log}");
    let daemon_lines: Vec<&str> = log.lines().filter(|l| l.starts_with('<')).collect();
    assert!(
        daemon_lines.iter().any(|l| l.starts_with("<6>reservd ")),
        "start-up line at info priority:\n{log}"
    );
    for l in daemon_lines {
        let body = &l[3..];
        assert!(
            !body.starts_with(|c: char| c.is_ascii_digit()) && !body.starts_with('['),
            "no timestamp in journal lines: {l:?}"
        );
    }
}
