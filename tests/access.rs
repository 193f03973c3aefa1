//! Privileges, seccomp and access control of the built `reservd` binary:
//! the seccomp allow-list (built by the library and tried in a filtered
//! thread, then the real daemon serving under it), `--allow-uid` and
//! `--allow-gid` checked against the client's credentials, and the mode
//! and group of the socket reservd creates.
//!
//! Raw system calls probe the filter and change credentials in forked
//! children: this file opts in to `unsafe`, each block with its SAFETY.
#![allow(unsafe_code)]

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use reservd_daemon::sandbox::seccomp::{self, Mode};
use reservd_testkit::disks::*;
use reservd_testkit::frames::*;
use reservd_testkit::spawn::*;

/// The daemon under test.
const RESERVD: &str = env!("CARGO_BIN_EXE_reservd");

fn serve(sock: &Path, extra: &[&str]) -> Proc {
    let mut args = vec!["-k", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut p = Proc::start(RESERVD, &args);
    p.wait_socket(sock);
    p
}

/// One READ KEYS with a regular file as the disk: the command reaches the
/// kernel (SG_IO on a file fails with ENOTTY), answered CHECK CONDITION,
/// ABORTED COMMAND/00/06.
fn read_keys_on_a_file(sock: &Path, dir: &TempDir) {
    let (mut c, _) = hello(sock, 0);
    let f = regular_file(dir, "disk.img");
    send_frame(&c, &read_keys(0x2000), &[f.as_fd()]);
    let out = read_reply(&mut c);
    assert_eq!(out.status(), 0x02);
    assert_eq!(out.sense_code(), (0x0b, 0x00, 0x06));
}

// ------------------------------------------------------------- seccomp

/// What a few system calls return in a thread running under the filter of
/// `mode`: Ok(value) or Err(errno).
struct Probe {
    socket_inet: Result<i32, i32>,
    socket_unix: Result<i32, i32>,
    blkgetsize64: Result<i32, i32>,
    sg_io: Result<i32, i32>,
    tgkill_other: Result<i32, i32>,
    setuid: Result<i32, i32>,
}

fn errno_result(r: libc::c_long) -> Result<i32, i32> {
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    } else {
        Ok(r as i32)
    }
}

/// Install reservd's filter for `mode` in a new thread (a filter without
/// TSYNC covers only its thread) and make the probing calls there.
fn probe(mode: Mode) -> Probe {
    let dir = TempDir::new();
    let file = regular_file(&dir, "file");
    let fd = file.as_raw_fd();
    let pid = std::process::id();
    // Another process to aim tgkill at, with signal 0 (nothing sent).
    let mut other = std::process::Command::new("sleep")
        .arg("10")
        .spawn()
        .unwrap();
    let other_pid = other.id() as libc::c_long;
    let p =
        std::thread::spawn(move || {
            // SAFETY: prctl with integer arguments; NO_NEW_PRIVS is per thread.
            let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            assert_eq!(r, 0);
            seccomp::install_this_thread(mode, pid).unwrap();
            let close = |r: Result<i32, i32>| {
                if let Ok(fd) = r {
                    // SAFETY: fd was just returned by socket() and is closed once.
                    unsafe { libc::close(fd) };
                }
                r
            };
            let mut size: u64 = 0;
            let mut hdr = [0u8; 88];
            // SAFETY: socket() with integer arguments.
            let socket_inet =
                close(errno_result(
                    unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) } as libc::c_long,
                ));
            // SAFETY: as above.
            let socket_unix =
                close(errno_result(
                    unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) } as libc::c_long,
                ));
            // SAFETY: BLKGETSIZE64 writes a u64 to `size`; fd is open.
            let blkgetsize64 =
                errno_result(
                    unsafe { libc::ioctl(fd, 0x8008_1272_u32 as _, &mut size as *mut u64) }
                        as libc::c_long,
                );
            // SAFETY: a regular file answers SG_IO with ENOTTY before reading
            // the header; `hdr` is as large as sg_io_hdr anyway.
            let sg_io = errno_result(unsafe {
                libc::ioctl(fd, reservd_proto::sg::SG_IO as _, hdr.as_mut_ptr())
            } as libc::c_long);
            // SAFETY: signal 0 only checks that the target exists.
            let tgkill_other =
                errno_result(unsafe { libc::syscall(libc::SYS_tgkill, other_pid, other_pid, 0) });
            // SAFETY: setuid to the current uid changes nothing when allowed.
            let setuid = errno_result(unsafe {
                libc::syscall(libc::SYS_setuid, libc::getuid() as libc::c_long)
            });
            Probe {
                socket_inet,
                socket_unix,
                blkgetsize64,
                sg_io,
                tgkill_other,
                setuid,
            }
        })
        .join()
        .unwrap();
    let _ = other.kill();
    let _ = other.wait();
    p
}

#[test]
fn enforce_refuses_calls_outside_the_list_with_eperm() {
    let p = probe(Mode::Enforce);
    assert_eq!(p.socket_inet, Err(libc::EPERM), "socket(AF_INET)");
    assert_eq!(p.blkgetsize64, Err(libc::EPERM), "ioctl(BLKGETSIZE64)");
    assert_eq!(p.tgkill_other, Err(libc::EPERM), "tgkill(another process)");
    assert_eq!(p.setuid, Err(libc::EPERM), "setuid");
    // Allowed calls reach the kernel.
    assert!(
        p.socket_unix.is_ok(),
        "socket(AF_UNIX): {:?}",
        p.socket_unix
    );
    assert_eq!(p.sg_io, Err(libc::ENOTTY), "ioctl(SG_IO) on a regular file");
}

#[test]
fn log_lets_every_call_through() {
    let p = probe(Mode::Log);
    assert!(
        p.socket_inet.is_ok(),
        "socket(AF_INET): {:?}",
        p.socket_inet
    );
    // A regular file has no BLKGETSIZE64: the kernel's answer, not EPERM.
    assert_eq!(p.blkgetsize64, Err(libc::ENOTTY), "ioctl(BLKGETSIZE64)");
    assert_eq!(p.tgkill_other, Ok(0), "tgkill(another process, 0)");
    assert_eq!(p.sg_io, Err(libc::ENOTTY), "ioctl(SG_IO)");
}

#[test]
fn off_builds_no_filter() {
    assert!(seccomp::build(Mode::Off, 1).unwrap().is_none());
    assert!(seccomp::build(Mode::Enforce, 1).unwrap().is_some());
}

/// `Seccomp:` of every thread of `pid`.
fn seccomp_of_threads(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| {
            let text = std::fs::read_to_string(t.unwrap().path().join("status")).unwrap();
            text.lines()
                .find_map(|l| l.strip_prefix("Seccomp:"))
                .unwrap()
                .trim()
                .to_string()
        })
        .collect()
}

#[test]
fn daemon_serves_under_seccomp_enforce_on_every_thread() {
    let dir = TempDir::new();
    for args in [&["--seccomp=enforce"][..], &[][..]] {
        let sock = dir.join("s.sock");
        let mut p = serve(&sock, args);
        // Two commands at once so that more than one server thread runs.
        read_keys_on_a_file(&sock, &dir);
        read_keys_on_a_file(&sock, &dir);
        let threads = seccomp_of_threads(p.pid());
        assert!(threads.len() >= 2, "{args:?}: threads {threads:?}");
        assert!(threads.iter().all(|s| s == "2"), "{args:?}: {threads:?}");
        assert_eq!(proc_status(p.pid(), "Seccomp_filters"), "1", "{args:?}");
        let (status, stderr) = p.stop();
        assert!(status.success(), "{args:?}: {stderr}");
        // The socket is removed at exit under the filter too.
        assert!(!sock.exists(), "{args:?}");
    }
}

#[test]
fn seccomp_off_installs_no_filter_and_bad_modes_are_refused() {
    let dir = TempDir::new();
    let sock = dir.join("s.sock");
    let mut p = serve(&sock, &["--seccomp=off"]);
    read_keys_on_a_file(&sock, &dir);
    assert!(seccomp_of_threads(p.pid()).iter().all(|s| s == "0"));
    assert!(p.stop().0.success());

    let (status, _, stderr) = run_to_end(RESERVD, &["--seccomp=strict", "-k", "/tmp/x.sock"]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--seccomp"), "{stderr}");
}

#[test]
#[ignore = "needs root; run by scripts/test.sh"]
fn daemon_as_nobody_serves_under_seccomp_enforce() {
    require(true, &[]);
    let dir = TempDir::new();
    let sock = dir.join("s.sock");
    let mut p = serve(&sock, &["-u", "nobody", "--seccomp=enforce"]);
    read_keys_on_a_file(&sock, &dir);
    read_keys_on_a_file(&sock, &dir);
    assert_eq!(
        proc_status(p.pid(), "Uid").split_whitespace().next(),
        Some("65534")
    );
    let threads = seccomp_of_threads(p.pid());
    assert!(threads.iter().all(|s| s == "2"), "{threads:?}");
    assert_eq!(proc_status(p.pid(), "NoNewPrivs"), "1");
    let (status, stderr) = p.stop();
    assert!(status.success(), "{stderr}");
}

// ------------------------------------------------------ socket mode, group

#[test]
fn socket_is_created_0600_by_default_whatever_the_umask() {
    let dir = TempDir::new();
    let sock = dir.join("s.sock");
    let mut cmd = std::process::Command::new(RESERVD);
    cmd.args(["-k", sock.to_str().unwrap()]);
    // SAFETY: umask is async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let mut p = Proc::spawn(cmd);
    p.wait_socket(&sock);
    let m = std::fs::metadata(&sock).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o600);
    assert!(p.stop().0.success());
}

#[test]
fn socket_mode_is_applied_and_validated() {
    let dir = TempDir::new();
    let sock = dir.join("s.sock");
    let mut p = serve(&sock, &["--socket-mode", "0660"]);
    let m = std::fs::metadata(&sock).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o660);
    read_keys_on_a_file(&sock, &dir);
    assert!(p.stop().0.success());
    for bad in ["999", "1777", "rw", ""] {
        let (status, _, stderr) = run_to_end(
            RESERVD,
            &["--socket-mode", bad, "-k", sock.to_str().unwrap()],
        );
        assert_eq!(status.code(), Some(1), "{bad}: {stderr}");
        assert!(stderr.contains("--socket-mode"), "{bad}: {stderr}");
    }
}

#[test]
#[ignore = "needs root; run by scripts/test.sh"]
fn socket_group_is_applied() {
    require(true, &[]);
    let dir = TempDir::new();
    let sock = dir.join("s.sock");
    for group in ["nogroup", "65534"] {
        let mut p = serve(&sock, &["--socket-group", group, "--socket-mode", "660"]);
        let m = std::fs::metadata(&sock).unwrap();
        assert_eq!(m.gid(), 65534, "{group}");
        assert_eq!(m.permissions().mode() & 0o7777, 0o660, "{group}");
        assert!(p.stop().0.success());
    }
    let (status, _, stderr) = run_to_end(
        RESERVD,
        &[
            "--socket-group",
            "no-such-group-here",
            "-k",
            sock.to_str().unwrap(),
        ],
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("invalid group"), "{stderr}");
    assert!(!sock.exists());
}

#[test]
#[ignore = "needs systemd-socket-activate (package systemd); run by scripts/test.sh"]
fn socket_mode_and_group_are_errors_with_socket_activation() {
    require(false, &["systemd-socket-activate"]);
    let dir = TempDir::new();
    let sock = dir.join("act.sock");
    for opt in [&["--socket-mode", "0660"][..], &["--socket-group", "0"][..]] {
        let mut cmd = std::process::Command::new("systemd-socket-activate");
        cmd.args(["-l", sock.to_str().unwrap(), RESERVD]).args(opt);
        let mut p = Proc::spawn(cmd);
        p.wait_socket(&sock);
        // The first connection execs reservd, which refuses to start.
        let mut c = connect(&sock);
        assert!(read_up_to(&mut c, 4).is_empty(), "{opt:?}: served");
        // finish(), not wait_timeout(): it also waits until every byte of
        // stderr has been read (it panics if reservd keeps running).
        let (status, _, stderr) = p.finish();
        assert!(!status.success(), "{opt:?}");
        assert!(
            stderr.contains("can't be used with socket activation"),
            "{opt:?}: {stderr}"
        );
    }
}

// ------------------------------------------------- --allow-uid, --allow-gid

/// Connect to `sock` from a forked child running as `uid`/`gid`; the
/// number of handshake bytes it read (0: closed at once).
fn handshake_bytes_as(sock: &Path, uid: u32, gid: u32) -> (i32, usize) {
    let addr = nix::sys::socket::UnixAddr::new(sock).unwrap();
    // SAFETY: the child makes only system calls (no allocation, no locks)
    // and leaves with _exit.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            // SAFETY: raw system calls with prepared arguments.
            unsafe {
                let ok = libc::setgroups(0, std::ptr::null()) == 0
                    && libc::setresgid(gid, gid, gid) == 0
                    && libc::setresuid(uid, uid, uid) == 0;
                if !ok {
                    libc::_exit(100);
                }
                let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                use nix::sys::socket::SockaddrLike;
                if s < 0 || libc::connect(s, addr.as_ptr().cast(), addr.len()) != 0 {
                    libc::_exit(101);
                }
                let tv = libc::timeval {
                    tv_sec: 5,
                    tv_usec: 0,
                };
                libc::setsockopt(
                    s,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &tv as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                let mut buf = [0u8; 4];
                let mut got = 0usize;
                while got < 4 {
                    let n = libc::read(s, buf.as_mut_ptr().add(got).cast(), 4 - got);
                    if n <= 0 {
                        break;
                    }
                    got += n as usize;
                }
                libc::_exit(got as i32);
            }
        }
        nix::unistd::ForkResult::Parent { child } => {
            let status = nix::sys::wait::waitpid(child, None).unwrap();
            match status {
                nix::sys::wait::WaitStatus::Exited(_, code) => {
                    assert!(code <= 4, "client child failed: exit {code}");
                    (child.as_raw(), code as usize)
                }
                other => panic!("client child: {other:?}"),
            }
        }
    }
}

#[test]
#[ignore = "needs root; run by scripts/test.sh"]
fn disallowed_peer_is_closed_before_the_handshake_and_logged() {
    require(true, &[]);
    let dir = TempDir::new();
    // The directory must let nobody reach the socket.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = dir.join("s.sock");
    let mut p = serve(
        &sock,
        &[
            "--allow-uid",
            "12345,daemon",
            "--allow-gid",
            "54321",
            "--socket-mode",
            "0666",
        ],
    );
    let (pid, got) = handshake_bytes_as(&sock, 65534, 65534);
    assert_eq!(got, 0, "a refused peer read handshake bytes");
    let line = format!("refusing connection from pid {pid} uid 65534 gid 65534: not allowed");
    assert!(p.wait_stderr(&line), "{}", p.stderr());
    let stderr = p.stderr();
    let logged = stderr.lines().find(|l| l.contains(&line)).unwrap();
    assert!(logged.contains("WARN"), "{logged}");
    // Root always passes; the daemon is still serving.
    read_keys_on_a_file(&sock, &dir);
    let (status, _) = p.stop();
    assert!(status.success());
}

#[test]
#[ignore = "needs root; run by scripts/test.sh"]
fn allowed_uid_or_gid_is_served() {
    require(true, &[]);
    let dir = TempDir::new();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = dir.join("s.sock");
    for (args, uid, gid) in [
        (&["--allow-uid", "nobody"][..], 65534, 65534),
        (&["--allow-uid", "65534"][..], 65534, 12345),
        (&["--allow-gid", "nogroup"][..], 12345, 65534),
        (
            &["--allow-uid", "1", "--allow-gid", "2,65534"][..],
            12345,
            65534,
        ),
    ] {
        let mut all = args.to_vec();
        all.extend(["--socket-mode", "0666"]);
        let mut p = serve(&sock, &all);
        let (_, got) = handshake_bytes_as(&sock, uid, gid);
        assert_eq!(got, 4, "{args:?} uid {uid} gid {gid}");
        // And one that is in neither list is refused by the same daemon.
        let (_, got) = handshake_bytes_as(&sock, 23456, 23456);
        assert_eq!(got, 0, "{args:?} uid 23456");
        assert!(p.stop().0.success());
    }
}

#[test]
#[ignore = "needs root; run by scripts/test.sh"]
fn a_flood_of_refused_peers_is_logged_at_most_ten_times_a_minute() {
    require(true, &[]);
    let dir = TempDir::new();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = dir.join("s.sock");
    let mut p = serve(&sock, &["--allow-uid", "12345", "--socket-mode", "0666"]);
    for _ in 0..25 {
        assert_eq!(handshake_bytes_as(&sock, 65534, 65534).1, 0);
    }
    // Served after the flood: the loop went on.
    read_keys_on_a_file(&sock, &dir);
    let (status, stderr) = p.stop();
    assert!(status.success());
    let refusals = stderr.lines().filter(|l| l.contains("not allowed")).count();
    assert_eq!(refusals, 10, "{stderr}");
}

#[test]
fn unknown_allowed_user_or_group_is_a_start_up_error() {
    for args in [
        &["--allow-uid", "no-such-user-here"][..],
        &["--allow-gid", "no-such-group-here"][..],
    ] {
        let mut all = args.to_vec();
        all.extend(["-k", "/tmp/reservd-access-never.sock"]);
        let (status, _, stderr) = run_to_end(RESERVD, &all);
        assert_eq!(status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("invalid"), "{args:?}: {stderr}");
        assert!(!Path::new("/tmp/reservd-access-never.sock").exists());
    }
}

#[test]
fn help_documents_the_access_options() {
    let (status, stdout, stderr) = run_to_end(RESERVD, &["--help"]);
    assert!(status.success(), "{stderr}");
    for opt in [
        "--seccomp <MODE>",
        "[default: enforce]",
        "[possible values: enforce, log, off]",
        "--allow-uid <USER[,USER...]>",
        "--allow-gid <GROUP[,GROUP...]>",
        "--socket-mode <MODE>",
        "--socket-group <GROUP>",
        "0600",
    ] {
        assert!(stdout.contains(opt), "no {opt:?} in {stdout}");
    }
}
