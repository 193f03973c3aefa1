//! Real QEMU as the client: a `pr-manager-helper` object connects to
//! reservd at start-up (handshake included), and QMP reports it connected.
//! No guest is booted (`-M none`), so no PR command is sent; the commands
//! themselves are covered by the protocol and VM tests.

use std::path::Path;
use std::process::Command;

use nix::sys::signal::Signal;
use reservd_testkit::disks::*;
use reservd_testkit::qemu::*;
use reservd_testkit::spawn::*;

/// The daemon under test.
const RESERVD: &str = env!("CARGO_BIN_EXE_reservd");

/// Start QEMU against `sock`, check that its pr-manager is connected, then
/// quit it through QMP.
fn assert_qemu_connects(dir: &TempDir, sock: &Path) {
    let qmp_path = dir.join("qmp.sock");
    let _ = std::fs::remove_file(&qmp_path);
    let mut q = qemu(sock, &qmp_path);
    // QEMU connects to the helper (and completes the handshake) before it
    // opens the QMP socket.
    q.wait_socket(&qmp_path);
    let mut qmp = Qmp::connect(&qmp_path);
    assert_eq!(
        qmp.execute("query-pr-managers"),
        r#"{"return": [{"connected": true, "id": "pr0"}]}"#
    );
    assert_eq!(qmp.execute("quit"), r#"{"return": {}}"#);
    let (status, _, stderr) = q.finish();
    assert!(status.success(), "QEMU: {stderr}");
}

#[test]
#[ignore = "needs qemu-system-x86_64 (package qemu-system-x86); run by scripts/test.sh"]
fn qemu_pr_manager_connects_to_reservd() {
    require(false, &[QEMU]);
    let dir = TempDir::new();
    let sock = dir.join("pr.sock");
    // As libvirt runs it: -k only.
    let mut r = Proc::start(RESERVD, &["-k", sock.to_str().unwrap(), "-vv"]);
    r.wait_socket(&sock);
    assert_qemu_connects(&dir, &sock);
    // reservd saw QEMU connect and leave.
    assert!(r.wait_stderr("closed"), "{}", r.stderr());
    // reservd serves the next QEMU as well.
    assert_qemu_connects(&dir, &sock);
    let (status, stderr) = r.stop();
    assert!(status.success(), "{stderr}");
}

#[test]
#[ignore = "needs qemu-system-x86_64 (package qemu-system-x86); run by scripts/test.sh"]
fn qemu_connects_to_a_daemonized_reservd() {
    require(false, &[QEMU]);
    let dir = TempDir::new();
    let sock = dir.join("pr.sock");
    let pid = dir.join("pr.pid");
    // As older libvirt and init scripts run it: -d -f.
    let (status, _, stderr) = run_to_end(
        RESERVD,
        &[
            "-d",
            "-k",
            sock.to_str().unwrap(),
            "-f",
            pid.to_str().unwrap(),
        ],
    );
    assert!(status.success(), "{stderr}");
    let daemon: i32 = std::fs::read_to_string(&pid)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _guard = PidGuard(daemon);
    assert_qemu_connects(&dir, &sock);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon), Signal::SIGTERM).unwrap();
    assert!(wait_until(DEADLINE, || process_gone(daemon)));
}

#[test]
#[ignore = "needs qemu-system-x86_64 and systemd-socket-activate; run by scripts/test.sh"]
fn qemu_connects_through_socket_activation() {
    require(false, &[QEMU, "systemd-socket-activate"]);
    let dir = TempDir::new();
    let sock = dir.join("pr.sock");
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.args(["-l", sock.to_str().unwrap(), RESERVD]);
    let mut r = Proc::spawn(cmd);
    r.wait_socket(&sock);
    // QEMU's connection is the one that starts reservd.
    assert_qemu_connects(&dir, &sock);
    let (status, stderr) = r.stop();
    assert!(status.success(), "{stderr}");
}

#[test]
#[ignore = "needs qemu-system-x86_64 (package qemu-system-x86); run by scripts/test.sh"]
fn qemu_without_a_listening_helper_fails_to_start() {
    require(false, &[QEMU]);
    let dir = TempDir::new();
    let sock = dir.join("nobody-listens.sock");
    let mut q = qemu(&sock, &dir.join("qmp.sock"));
    let (status, _, stderr) = q.finish();
    assert!(!status.success(), "QEMU started without a helper");
    assert!(
        stderr.contains(sock.to_str().unwrap()),
        "QEMU's error does not name the socket: {stderr}"
    );

    // The same after reservd has stopped: its socket is gone.
    let mut r = Proc::start(RESERVD, &["-k", sock.to_str().unwrap()]);
    r.wait_socket(&sock);
    assert!(r.stop().0.success());
    let (status, _, _) = qemu(&sock, &dir.join("qmp.sock")).finish();
    assert!(!status.success(), "QEMU started after reservd stopped");
}
