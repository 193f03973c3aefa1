//! The built daemon's metrics: the metrics socket (`--metrics-socket`,
//! read with `reservdctl metrics`) and the textfile (`--metrics-file`),
//! under the default seccomp filter; the counts after known commands; the
//! access control on the metrics socket; start-up errors; nothing left
//! behind at exit.

use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use reservd_client::metrics::{parse, sum, Sample};
use reservd_testkit::disks::*;
use reservd_testkit::frames::*;
use reservd_testkit::spawn::*;

const RESERVD: &str = env!("CARGO_BIN_EXE_reservd");
const RESERVDCTL: &str = env!("CARGO_BIN_EXE_reservdctl");

/// reservd on `dir`/r.sock with `extra` options, serving: its socket
/// exists as soon as it is bound, the metrics socket and file once
/// start-up is done, before the first handshake. That handshake's
/// connection is the first one counted.
fn serve(dir: &TempDir, extra: &[&str]) -> Proc {
    let sock = dir.join("r.sock");
    let mut args = vec!["-k", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut p = Proc::start(RESERVD, &args);
    if let Err(e) = p.wait_ready(&sock, Ready::Hello, DEADLINE) {
        panic!("{e}");
    }
    p
}

/// `reservdctl metrics` on `socket`: (exit status, stdout, stderr).
fn ctl_metrics(socket: &Path, json: bool) -> (i32, String, String) {
    let mut args = vec!["metrics", "--metrics-socket", socket.to_str().unwrap()];
    if json {
        args.push("--json");
    }
    let (status, out, err) = run_to_end(RESERVDCTL, &args);
    (status.code().unwrap(), out, err)
}

fn samples(socket: &Path) -> Vec<Sample> {
    let (code, out, err) = ctl_metrics(socket, false);
    assert_eq!(code, 0, "{err}");
    parse(&out).unwrap()
}

/// Send `n` READ KEYS and one REGISTER on one connection (a regular file:
/// CHECK CONDITION from SG_IO), then a frame with a bad opcode on another.
fn commands(dir: &TempDir, n: usize) {
    let sock = dir.join("r.sock");
    let (mut s, _) = hello(&sock, 0);
    let f = regular_file(dir, "disk.img");
    for _ in 0..n {
        send_frame(&s, &read_keys(0x2000), &[f.as_fd()]);
        assert_eq!(read_reply(&mut s).status(), 2);
    }
    send_frame(&s, &register(24), &[f.as_fd()]);
    send(&s, &register_params(0x1234), &[]).unwrap();
    assert_eq!(read_reply(&mut s).status(), 2);
    drop(s);
    let (mut bad, _) = hello(&sock, 0);
    send_frame(&bad, &cdb(&[0x12]), &[f.as_fd()]);
    assert_closed(&mut bad);
}

#[test]
fn the_metrics_socket_counts_commands_connections_and_errors() {
    let dir = TempDir::new();
    let msock = dir.join("m.sock");
    let mut d = serve(&dir, &["--metrics-socket", msock.to_str().unwrap()]);
    let mode = std::fs::metadata(&msock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "root's only");
    commands(&dir, 3);
    let s = samples(&msock);
    let count = |labels: &[(&str, &str)]| sum(&s, "reservd_commands_total", labels);
    assert_eq!(
        count(&[
            ("command", "PR_IN"),
            ("service_action", "READ_KEYS"),
            ("status", "CHECK_CONDITION"),
            ("backend", "sgio"),
        ]),
        3.0
    );
    assert_eq!(
        count(&[
            ("service_action", "REGISTER"),
            ("status", "CHECK_CONDITION")
        ]),
        1.0
    );
    assert_eq!(count(&[]), 4.0, "the bad frame is no command");
    assert_eq!(
        sum(
            &s,
            "reservd_command_duration_seconds_count",
            &[("service_action", "READ_KEYS"), ("backend", "sgio")]
        ),
        3.0
    );
    assert_eq!(
        sum(
            &s,
            "reservd_command_duration_seconds_bucket",
            &[("service_action", "READ_KEYS"), ("le", "+Inf")]
        ),
        3.0
    );
    for (name, want) in [
        ("reservd_connections_accepted_total", 3.0),
        ("reservd_connections_protocol_errors_total", 1.0),
        ("reservd_connections_open", 0.0),
        ("reservd_commands_in_flight", 0.0),
        ("reservd_commands_hung", 0.0),
        ("reservd_metrics_requests_total", 1.0),
        ("reservd_multipath_active", 0.0),
    ] {
        assert_eq!(sum(&s, name, &[]), want, "{name}");
    }
    // An open connection is counted; the metrics request before is too.
    let (_open, _) = hello(&dir.join("r.sock"), 0);
    let s = samples(&msock);
    assert_eq!(sum(&s, "reservd_connections_open", &[]), 1.0);
    assert_eq!(sum(&s, "reservd_metrics_requests_total", &[]), 2.0);
    // --json: one array with the same samples.
    let (code, out, _) = ctl_metrics(&msock, true);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 1);
    assert!(out.starts_with("[{\"name\":\"reservd_info\",\"labels\":{\"version\":"));
    assert!(out.contains(
        "{\"name\":\"reservd_commands_total\",\"labels\":{\"backend\":\"sgio\",\
         \"command\":\"PR_IN\",\"service_action\":\"READ_KEYS\",\"status\":\"CHECK_CONDITION\"},\
         \"value\":3.0}"
    ));
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(!msock.exists(), "the metrics socket is removed at exit");
}

#[test]
fn the_metrics_file_is_rewritten_and_removed_at_exit() {
    let dir = TempDir::new();
    let file = dir.join("reservd.prom");
    let mut d = serve(
        &dir,
        &[
            "--metrics-file",
            file.to_str().unwrap(),
            "--metrics-interval",
            "1",
        ],
    );
    // Written at start-up, before any command.
    let first = parse(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(sum(&first, "reservd_commands_total", &[]), 0.0);
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644, "readable by the collector");
    commands(&dir, 2);
    // Within a few intervals, the file has the commands (written under
    // the seccomp filter: create, fchmod, rename).
    let counted = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&file)
            .ok()
            .and_then(|t| parse(&t).ok())
            .is_some_and(|s| sum(&s, "reservd_commands_total", &[]) == 3.0)
    });
    assert!(counted, "{:?}", std::fs::read_to_string(&file));
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.ends_with(".tmp")),
        "no temporary file left between writes: {names:?}"
    );
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(!log.contains("cannot write the metrics file"), "{log}");
    assert!(!file.exists(), "removed at exit");
}

#[test]
fn metrics_options_errors_are_one_line_and_leave_nothing() {
    let dir = TempDir::new();
    let sock = dir.join("r.sock");
    for (args, needle) in [
        (
            vec!["--metrics-socket", "relative.sock"],
            "must be absolute",
        ),
        (
            vec!["--metrics-file", "/nonexistent/reservd/x.prom"],
            "cannot write the metrics file /nonexistent/reservd/x.prom",
        ),
        (vec!["--metrics-interval", "0"], "--metrics-interval"),
    ] {
        let mut all = vec!["-k", sock.to_str().unwrap()];
        all.extend(args.iter());
        let (status, _, stderr) = run_to_end(RESERVD, &all);
        assert_eq!(status.code(), Some(1), "{args:?}: {stderr}");
        let ours: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("reservd:") || l.starts_with("error:"))
            .collect();
        assert_eq!(ours.len(), 1, "{args:?}: {stderr}");
        assert!(ours[0].contains(needle), "{args:?}: {stderr}");
        assert!(!sock.exists(), "{args:?}: the main socket is left behind");
    }
    // reservdctl looks where the packaged unit lets reservd create it.
    let (status, help, _) = run_to_end(RESERVDCTL, &["metrics", "--help"]);
    assert!(status.success());
    assert!(
        help.contains(&format!(
            "[default: {}]",
            reservd_client::metrics::DEFAULT_SOCKET
        )),
        "{help}"
    );
    // A metrics socket nobody serves: reservdctl says so.
    let (code, _, err) = ctl_metrics(&dir.join("none.sock"), false);
    assert_eq!(code, 1);
    assert!(err.contains("reservd --metrics-socket"), "{err}");
}

/// The metrics socket's file is root's (0600); opened to everyone, the
/// access control still applies: with --allow-uid, another user is closed
/// before any byte, and reservdctl says why.
#[test]
#[ignore = "needs root and setpriv (util-linux); run by scripts/test.sh"]
fn the_metrics_socket_applies_the_allow_list() {
    let dir = TempDir::new();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |msock: &Path| {
        let out = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                RESERVDCTL,
            ])
            .args(["metrics", "--metrics-socket", msock.to_str().unwrap()])
            .output()
            .expect("setpriv");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for (allow, served) in [(None, true), (Some("4242"), false), (Some("65534"), true)] {
        let msock = dir.join("m.sock");
        let mut extra = vec!["--metrics-socket", msock.to_str().unwrap()];
        if let Some(a) = allow {
            extra.extend(["--allow-uid", a]);
        }
        let mut d = serve(&dir, &extra);
        std::fs::set_permissions(&msock, std::fs::Permissions::from_mode(0o666)).unwrap();
        let (code, out, err) = as_nobody(&msock);
        if served {
            assert_eq!(code, Some(0), "{allow:?}: {err}");
            assert!(out.contains("reservd_info{"), "{allow:?}: {out}");
        } else {
            assert_eq!(code, Some(1), "{allow:?}: {out}");
            assert!(err.contains("not allowed"), "{allow:?}: {err}");
        }
        // root always passes.
        assert!(samples(&msock).iter().any(|s| s.name == "reservd_info"));
        d.stop();
    }
}
