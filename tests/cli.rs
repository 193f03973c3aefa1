//! The built `reservd` binary as a drop-in `qemu-pr-helper`: every option
//! of the compatible command line, the reservd-only options, signals,
//! systemd socket activation and readiness, privileges and start-up errors.

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use reservd_testkit::disks::*;
use reservd_testkit::frames::*;
use reservd_testkit::spawn::*;

/// The daemon under test.
const RESERVD: &str = env!("CARGO_BIN_EXE_reservd");

/// The lines reservd itself wrote (other programs may share stderr).
fn reservd_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.starts_with("reservd:"))
        .collect()
}

/// A start-up failure: exit 1 and exactly one line on stderr, which
/// contains `needle`.
fn assert_one_line_error(args: &[&str], needle: &str) {
    let (status, stdout, stderr) = run_to_end(RESERVD, args);
    assert_eq!(status.code(), Some(1), "{args:?}: stderr {stderr}");
    assert_eq!(stdout, "", "{args:?}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: expected one line, got {stderr:?}"
    );
    assert!(
        lines[0].starts_with("reservd: ") && lines[0].contains(needle),
        "{args:?}: {:?} does not mention {needle:?}",
        lines[0]
    );
}

/// Start reservd on `sock` with `extra` options and wait for the socket.
fn serve(sock: &Path, extra: &[&str]) -> Proc {
    let mut args = vec!["-k", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut p = Proc::start(RESERVD, &args);
    p.wait_socket(sock);
    p
}

/// One PR IN READ KEYS with a read-write regular file as the "disk": SG_IO
/// fails with ENOTTY, which is CHECK CONDITION, ABORTED COMMAND/00/06.
fn read_keys_on_a_file(stream: &mut UnixStream, dir: &TempDir) -> Reply {
    let f = regular_file(dir, "disk.img");
    send_frame(stream, &read_keys(0x2000), &[f.as_fd()]);
    read_reply(stream)
}

// ---------------------------------------------------------------- -h, -V

#[test]
fn help_lists_every_option_and_the_default_paths() {
    for flag in ["-h", "--help"] {
        let (status, stdout, stderr) = run_to_end(RESERVD, &[flag]);
        assert!(status.success(), "{flag}: {stderr}");
        for opt in [
            "-h, --help",
            "-V, --version",
            "-k, --socket",
            "-f, --pidfile",
            "-d, --daemon",
            "-T, --trace",
            "-u, --user",
            "-g, --group",
            "-v, --verbose",
            "-q, --quiet",
            "--sgio-timeout",
            "--max-connections",
            "--enable-cleanup",
        ] {
            assert!(stdout.contains(opt), "{flag}: no {opt:?} in {stdout}");
        }
    }
    // The defaults are qemu-pr-helper's; only the long help has room for
    // them.
    let (_, stdout, _) = run_to_end(RESERVD, &["--help"]);
    assert!(stdout.contains("/var/run/qemu-pr-helper.sock"), "{stdout}");
    assert!(stdout.contains("/var/run/qemu-pr-helper.pid"), "{stdout}");
}

#[test]
fn version_prints_name_and_version() {
    for flag in ["-V", "--version"] {
        let (status, stdout, stderr) = run_to_end(RESERVD, &[flag]);
        assert!(status.success(), "{flag}: {stderr}");
        assert_eq!(
            stdout.lines().next(),
            Some(format!("reservd {}", env!("CARGO_PKG_VERSION")).as_str()),
            "{flag}"
        );
    }
}

// ------------------------------------------------------------------- -k

#[test]
fn socket_option_serves_the_handshake() {
    let dir = TempDir::new();
    for form in ["-k", "--socket"] {
        let sock = dir.join(&format!("{form}.sock"));
        let mut p = Proc::start(RESERVD, &[form, sock.to_str().unwrap()]);
        p.wait_socket(&sock);
        let (mut s, features) = hello(&sock, 0);
        assert_eq!(features, [0, 0, 0, 0], "{form}");
        let out = read_keys_on_a_file(&mut s, &dir);
        assert_eq!(out.status(), 0x02, "{form}");
        assert_eq!(out.sense_code(), (0x0b, 0x00, 0x06), "{form}");
        let (status, _) = p.stop();
        assert!(status.success(), "{form}");
    }
    // --socket=PATH, as getopt_long accepts it.
    let sock = dir.join("eq.sock");
    let mut p = Proc::start(RESERVD, &[&format!("--socket={}", sock.display())]);
    p.wait_socket(&sock);
    assert_eq!(hello(&sock, 0).1, [0, 0, 0, 0]);
}

#[test]
fn relative_socket_path_is_refused() {
    let dir = TempDir::new();
    let mut cmd = Command::new(RESERVD);
    cmd.args(["-k", "relative.sock"]).current_dir(dir.path());
    let (status, _, stderr) = Proc::spawn(cmd).finish();
    assert_eq!(status.code(), Some(1));
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
    assert!(stderr.contains("must be absolute"), "{stderr}");
    assert!(!dir.join("relative.sock").exists());
}

#[test]
fn repeated_option_takes_the_last_value() {
    let dir = TempDir::new();
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let mut p = Proc::start(
        RESERVD,
        &["-k", a.to_str().unwrap(), "-k", b.to_str().unwrap()],
    );
    p.wait_socket(&b);
    assert!(!a.exists(), "the first -k was used");
}

// -------------------------------------------------------- start-up errors

#[test]
fn startup_errors_are_one_line_and_leave_no_socket() {
    let dir = TempDir::new();
    let sock = dir.join("s.sock");
    let s = sock.to_str().unwrap();
    let missing = dir.join("missing/s.sock");
    assert_one_line_error(&["-k", missing.to_str().unwrap()], "cannot listen on");

    std::fs::create_dir(dir.join("adir")).unwrap();
    assert_one_line_error(
        &["-k", dir.join("adir").to_str().unwrap()],
        "is a directory",
    );

    let pid_missing = dir.join("missing/p.pid");
    assert_one_line_error(
        &["-k", s, "-f", pid_missing.to_str().unwrap()],
        "cannot open pid file",
    );
    assert!(!sock.exists(), "socket left behind by a failed start-up");

    let trace_missing = format!("file={}", dir.join("missing/trace.log").display());
    assert_one_line_error(&["-k", s, "-T", &trace_missing], "cannot open trace file");
    let events_missing = format!("events={}", dir.join("missing.events").display());
    assert_one_line_error(
        &["-k", s, "-T", &events_missing],
        "cannot read trace events file",
    );
    assert_one_line_error(&["-k", s, "-T", "bogus=1"], "unknown trace option");
    assert!(!sock.exists());
}

// ------------------------------------------------------------------- -f

#[test]
fn pidfile_is_written_locked_and_kept_without_daemon() {
    let dir = TempDir::new();
    let sock = dir.join("s.sock");
    let pid = dir.join("p.pid");
    let mut p = serve(&sock, &["-f", pid.to_str().unwrap()]);

    assert_eq!(
        std::fs::read_to_string(&pid).unwrap(),
        format!("{}\n", p.pid())
    );
    let mode = std::fs::metadata(&pid).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o600, "pid file mode {mode:o}");

    // The daemon holds a whole-file write lock.
    let f = std::fs::File::open(&pid).unwrap();
    let mut lock = libc::flock {
        l_type: libc::F_WRLCK as _,
        l_whence: libc::SEEK_SET as _,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_GETLK(&mut lock)).unwrap();
    assert_eq!(
        lock.l_type,
        libc::F_WRLCK as libc::c_short,
        "pid file not locked"
    );
    assert_eq!(lock.l_pid, p.pid());
    drop(f);

    // --pidfile=PATH spelling, on a second instance: refused, and since the
    // pid file is checked before the socket, the first instance's socket
    // (same path) is left alone.
    let (status, _, stderr) = run_to_end(
        RESERVD,
        &[
            "-k",
            sock.to_str().unwrap(),
            &format!("--pidfile={}", pid.display()),
        ],
    );
    assert_eq!(status.code(), Some(1));
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
    assert!(
        stderr.contains("cannot lock pid file") && stderr.contains(&p.pid().to_string()),
        "{stderr}"
    );
    let (mut c, _) = hello(&sock, 0);
    assert_eq!(read_keys_on_a_file(&mut c, &dir).status(), 0x02);
    drop(c);

    let (status, _) = p.stop();
    assert!(status.success());
    assert!(!sock.exists(), "socket not removed at exit");
    // The pid file stays, as qemu-pr-helper leaves it.
    assert_eq!(
        std::fs::read_to_string(&pid).unwrap(),
        format!("{}\n", p.pid())
    );
}

#[test]
#[ignore = "needs python3; run by scripts/test.sh"]
fn pidfile_locked_by_the_launcher_before_exec_is_accepted() {
    // Older libvirt creates and fcntl-locks the pid file in the child it
    // then execs the helper in, passing -f: the lock belongs to the helper's
    // own process and must not count as "another instance".
    require(false, &["python3"]);
    let dir = TempDir::new();
    let sock = dir.join("s.sock");
    let pid = dir.join("p.pid");
    let launcher = "import fcntl, os, sys\n\
                    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)\n\
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n\
                    os.set_inheritable(fd, True)\n\
                    os.execv(sys.argv[2], sys.argv[2:])\n";
    let mut cmd = Command::new("python3");
    cmd.args(["-c", launcher]).arg(&pid).args([
        RESERVD,
        "-k",
        sock.to_str().unwrap(),
        "-f",
        pid.to_str().unwrap(),
    ]);
    let mut p = Proc::spawn(cmd);
    p.wait_socket(&sock);
    assert!(wait_until(DEADLINE, || std::fs::read_to_string(&pid)
        .map(|t| t == format!("{}\n", p.pid()))
        .unwrap_or(false)));
    assert_eq!(hello(&sock, 0).1, [0, 0, 0, 0]);
    // And the lock is held by reservd from then on.
    let (status, _, stderr) = run_to_end(
        RESERVD,
        &[
            "-k",
            dir.join("t.sock").to_str().unwrap(),
            "-f",
            pid.to_str().unwrap(),
        ],
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot lock pid file"), "{stderr}");
    let (status, _) = p.stop();
    assert!(status.success());
}

// ------------------------------------------------------------------- -d

#[test]
fn daemon_option_detaches_once_the_socket_exists() {
    let dir = TempDir::new();
    let sock = dir.join("s.sock");
    let pid = dir.join("p.pid");
    let mut parent = Proc::start(
        RESERVD,
        &[
            "-d",
            "-k",
            sock.to_str().unwrap(),
            "-f",
            pid.to_str().unwrap(),
        ],
    );
    let parent_pid = parent.pid();
    let (status, stdout, stderr) = parent.finish();
    assert!(status.success(), "{stderr}");
    assert_eq!((stdout.as_str(), stderr.as_str()), ("", ""));
    // Already there when the parent returns: no polling.
    assert!(is_socket(&sock), "socket missing when the parent exited");
    let text = std::fs::read_to_string(&pid).unwrap();
    let daemon: i32 = text.trim_end().parse().unwrap();
    assert_eq!(text, format!("{daemon}\n"));
    let _guard = PidGuard(daemon);
    assert_ne!(daemon, parent_pid);
    assert!(!process_gone(daemon));

    assert_eq!(
        std::fs::read_link(format!("/proc/{daemon}/cwd")).unwrap(),
        Path::new("/")
    );
    for fd in 0..3 {
        assert_eq!(
            std::fs::read_link(format!("/proc/{daemon}/fd/{fd}")).unwrap(),
            Path::new("/dev/null"),
            "fd {fd}"
        );
    }
    // A session of its own (daemon(3) calls setsid).
    let stat = std::fs::read_to_string(format!("/proc/{daemon}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    assert_eq!(fields[3], daemon.to_string(), "session id");

    let (mut c, f) = hello(&sock, 0);
    assert_eq!(f, [0, 0, 0, 0]);
    assert_eq!(read_keys_on_a_file(&mut c, &dir).status(), 0x02);

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon), Signal::SIGTERM).unwrap();
    assert!(
        wait_until(DEADLINE, || process_gone(daemon)),
        "daemon alive"
    );
    assert!(!sock.exists(), "socket not removed on SIGTERM");
}

#[test]
fn daemon_reports_a_failure_after_the_fork_to_its_parent() {
    // The pid file is written after the fork; its error must still reach
    // the caller, with a non-zero exit, and the socket must go.
    let dir = TempDir::new();
    let sock = dir.join("s.sock");
    let pid = dir.join("missing/p.pid");
    assert_one_line_error(
        &[
            "-d",
            "-k",
            sock.to_str().unwrap(),
            "-f",
            pid.to_str().unwrap(),
        ],
        "cannot open pid file",
    );
    assert!(!sock.exists(), "socket left behind");
}

// ------------------------------------------------------------------- -T

#[test]
fn trace_pattern_enables_request_logging() {
    let dir = TempDir::new();
    let sock = dir.join("s.sock");
    let mut p = serve(&sock, &["-T", "pr_manager_*"]);
    let (mut c, _) = hello(&sock, 0);
    assert_eq!(read_keys_on_a_file(&mut c, &dir).status(), 0x02);
    assert!(p.wait_stderr("sense=0b/00/06"), "{}", p.stderr());
    let (_, stderr) = p.stop();
    let req = stderr
        .lines()
        .find(|l| l.contains("pr_helper_request"))
        .unwrap_or_else(|| panic!("no request line: {stderr}"));
    assert!(req.contains("cmd=0x5e service_action=0x00"), "{req}");
    let res = stderr
        .lines()
        .find(|l| l.contains("pr_helper_result"))
        .unwrap();
    assert!(res.contains("status=0x02 sense=0b/00/06 data=0"), "{res}");

    // Without -T: the same request leaves no trace.
    let mut p = serve(&sock, &[]);
    let (mut c, _) = hello(&sock, 0);
    assert_eq!(read_keys_on_a_file(&mut c, &dir).status(), 0x02);
    let (_, stderr) = p.stop();
    assert!(!stderr.contains("pr_helper_"), "{stderr}");
}

#[test]
fn trace_connection_event_logs_connections() {
    let dir = TempDir::new();
    let sock = dir.join("s.sock");
    let p = serve(&sock, &["-T", "enable=pr_helper_connection"]);
    let (c, _) = hello(&sock, 0);
    drop(c);
    assert!(p.wait_stderr("closed"), "{}", p.stderr());
    let text = p.stderr();
    assert!(text.contains("connection 1 from pid"), "{text}");
    // Requests are a different event.
    assert!(!text.contains("pr_helper_request"), "{text}");
}

#[test]
fn unknown_trace_pattern_is_only_a_warning() {
    let dir = TempDir::new();
    let sock = dir.join("s.sock");
    let mut p = serve(&sock, &["-T", "qio_channel_*"]);
    assert_eq!(hello(&sock, 0).1, [0, 0, 0, 0]);
    let (status, stderr) = p.stop();
    assert!(status.success());
    let lines = reservd_lines(&stderr);
    let warn: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("qio_channel_*"))
        .collect();
    assert_eq!(warn.len(), 1, "{stderr}");
    assert!(warn[0].contains("WARN"), "{}", warn[0]);
    assert!(lines.is_empty(), "no error expected: {stderr}");
}

#[test]
fn trace_file_and_events_file() {
    let dir = TempDir::new();
    let sock = dir.join("s.sock");
    let log = dir.join("trace.log");
    let events = dir.join("events");
    std::fs::write(&events, "# reservd events\npr_helper_result\n").unwrap();
    let spec = format!("events={},file={}", events.display(), log.display());
    let mut p = serve(&sock, &["--trace", &spec]);
    let (mut c, _) = hello(&sock, 0);
    assert_eq!(read_keys_on_a_file(&mut c, &dir).status(), 0x02);
    let (status, stderr) = p.stop();
    assert!(status.success());
    assert_eq!(stderr, "", "the log should go to the trace file");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("pr_helper_result"), "{text}");
    assert!(text.contains("sense=0b/00/06"), "{text}");
    // Only the event the file named.
    assert!(!text.contains("pr_helper_request"), "{text}");
}

// -------------------------------------------------------------- -u, -g

/// The identity and capability lines of /proc/PID/status.
fn assert_minimal_privileges(pid: i32, uid: u32, gid: u32) {
    let ids = |k: &str| {
        proc_status(pid, k)
            .split_whitespace()
            .map(|v| v.parse::<u32>().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids("Uid"), vec![uid; 4], "Uid");
    assert_eq!(ids("Gid"), vec![gid; 4], "Gid");
    assert_eq!(proc_status(pid, "Groups"), "", "supplementary groups");
    assert_eq!(proc_status(pid, "CapEff"), "0000000000020000", "CapEff");
    assert_eq!(proc_status(pid, "CapPrm"), "0000000000020000", "CapPrm");
    assert_eq!(proc_status(pid, "CapBnd"), "0000000000000000", "CapBnd");
    assert_eq!(proc_status(pid, "CapInh"), "0000000000000000", "CapInh");
    assert_eq!(proc_status(pid, "CapAmb"), "0000000000000000", "CapAmb");
    assert_eq!(proc_status(pid, "NoNewPrivs"), "1", "NoNewPrivs");
}

/// Every thread has the same credentials (capabilities are per thread).
fn assert_all_threads_like_main(pid: i32) {
    let keys = ["Uid", "Gid", "Groups", "CapEff", "CapPrm", "CapBnd"];
    let main: Vec<String> = keys.iter().map(|k| proc_status(pid, k)).collect();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid: i32 = t.unwrap().file_name().to_str().unwrap().parse().unwrap();
        let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
        for (k, v) in keys.iter().zip(&main) {
            let line = text
                .lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix(':'))
                .unwrap()
                .trim();
            assert_eq!(line, v, "thread {tid} {k}");
        }
    }
}

#[test]
#[ignore = "needs root; run by scripts/test.sh"]
fn user_and_group_switch_to_nobody_with_only_cap_sys_rawio() {
    require(true, &[]);
    let dir = TempDir::new();
    for args in [
        &["-u", "nobody", "-g", "nogroup"][..],
        &["--user", "65534", "--group", "65534"][..],
        // The user's primary group when -g is absent.
        &["-u", "nobody"][..],
    ] {
        let sock = dir.join("s.sock");
        let mut p = serve(&sock, args);
        // Serving (a server thread ran) before looking at the threads.
        let (mut c, _) = hello(&sock, 0);
        assert_eq!(read_keys_on_a_file(&mut c, &dir).status(), 0x02, "{args:?}");
        assert_minimal_privileges(p.pid(), 65534, 65534);
        assert_all_threads_like_main(p.pid());
        drop(c);
        let (status, _) = p.stop();
        assert!(status.success(), "{args:?}");
        let _ = std::fs::remove_file(&sock);
    }
}

#[test]
#[ignore = "needs root; run by scripts/test.sh"]
fn without_user_root_keeps_only_cap_sys_rawio() {
    require(true, &[]);
    let dir = TempDir::new();
    let sock = dir.join("s.sock");
    let mut p = serve(&sock, &[]);
    let (mut c, _) = hello(&sock, 0);
    assert_eq!(read_keys_on_a_file(&mut c, &dir).status(), 0x02);
    assert_minimal_privileges(p.pid(), 0, 0);
    assert_all_threads_like_main(p.pid());
    let (status, _) = p.stop();
    assert!(status.success());
}

#[test]
fn invalid_user_or_group_is_refused() {
    let dir = TempDir::new();
    let s = dir.join("s.sock");
    let s = s.to_str().unwrap();
    assert_one_line_error(
        &["-k", s, "-u", "no-such-user-reservd"],
        "invalid user 'no-such-user-reservd'",
    );
    assert_one_line_error(
        &["-k", s, "-g", "no-such-group-reservd"],
        "invalid group 'no-such-group-reservd'",
    );
    assert_one_line_error(&["-k", s, "-u", "12ab"], "invalid user '12ab'");
    assert!(!dir.join("s.sock").exists(), "names are checked first");
}

// -------------------------------------------------------------- -v, -q

#[test]
fn verbose_and_quiet_set_the_log_level() {
    let dir = TempDir::new();
    let sock = dir.join("s.sock");

    // Default: warnings and errors only; a clean run prints nothing.
    let mut p = serve(&sock, &[]);
    hello(&sock, 0);
    let (_, stderr) = p.stop();
    assert_eq!(stderr, "");

    // -v: start-up and shutdown are logged.
    let mut p = serve(&sock, &["-v"]);
    assert!(p.wait_stderr(&format!("listening on {}", sock.display())));
    let (_, stderr) = p.stop();
    assert!(stderr.contains("shutting down"), "{stderr}");
    assert!(!stderr.contains("DEBUG"), "{stderr}");

    // -vv (and --verbose twice): connections too.
    for args in [&["-vv"][..], &["--verbose", "--verbose"][..]] {
        let mut p = serve(&sock, args);
        let (c, _) = hello(&sock, 0);
        drop(c);
        assert!(p.wait_stderr("closed"), "{args:?}: {}", p.stderr());
        let (_, stderr) = p.stop();
        assert!(stderr.contains("DEBUG"), "{stderr}");
    }

    // -q silences warnings.
    for q in ["-q", "--quiet"] {
        let mut p = serve(&sock, &[q, "-T", "no_such_event"]);
        hello(&sock, 0);
        let (_, stderr) = p.stop();
        assert_eq!(stderr, "", "{q}");
    }
    // ... but not a fatal error.
    assert_one_line_error(&["-q", "-k", "relative.sock"], "must be absolute");
}

// ---------------------------------------------- other arguments and options

#[test]
fn positional_arguments_are_ignored() {
    let dir = TempDir::new();
    let sock = dir.join("s.sock");
    let mut p = Proc::start(
        RESERVD,
        &["FILE", "-k", sock.to_str().unwrap(), "other", "args"],
    );
    p.wait_socket(&sock);
    assert_eq!(hello(&sock, 0).1, [0, 0, 0, 0]);
    let (status, _) = p.stop();
    assert!(status.success());
}

#[test]
fn unknown_option_prints_one_line_and_the_hint() {
    for (args, needle) in [
        (&["-x"][..], "'-x'"),
        (&["--bogus"][..], "'--bogus'"),
        (&["-k"][..], "--socket"),
        (&["--max-connections", "many"][..], "many"),
    ] {
        let (status, stdout, stderr) = run_to_end(RESERVD, args);
        assert_eq!(status.code(), Some(1), "{args:?}");
        assert_eq!(stdout, "");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 2, "{args:?}: {stderr:?}");
        assert!(
            lines[0].starts_with("reservd: ") && lines[0].contains(needle),
            "{args:?}: {:?}",
            lines[0]
        );
        assert_eq!(lines[1], "Try 'reservd --help' for more information.");
    }
}

#[test]
fn sgio_timeout_is_validated_and_applied() {
    let dir = TempDir::new();
    let sock = dir.join("s.sock");
    let p = serve(&sock, &["-v", "--sgio-timeout", "1234"]);
    assert!(p.wait_stderr("SG_IO timeout 1234 ms"), "{}", p.stderr());
    drop(p);
    let p = serve(&sock, &["-v"]);
    assert!(p.wait_stderr("SG_IO timeout 30000 ms"), "{}", p.stderr());
    drop(p);
    for bad in ["0", "-1", "soon"] {
        let opt = format!("--sgio-timeout={bad}");
        let (status, _, stderr) = run_to_end(RESERVD, &["-k", sock.to_str().unwrap(), &opt]);
        assert_eq!(status.code(), Some(1), "{bad}: {stderr}");
        assert!(stderr.contains("--sgio-timeout"), "{stderr}");
    }
}

#[test]
fn max_connections_refuses_the_extra_connection() {
    let dir = TempDir::new();
    let sock = dir.join("s.sock");
    let _p = serve(&sock, &["--max-connections", "2"]);
    let (mut a, fa) = hello(&sock, 0);
    let (mut b, fb) = hello(&sock, 0);
    assert_eq!((fa, fb), ([0; 4], [0; 4]));

    // The third is accepted by the kernel, then closed without a word.
    let mut c = connect(&sock);
    assert_eq!(
        read_up_to(&mut c, 4),
        Vec::<u8>::new(),
        "third connection served"
    );

    // The two admitted ones still work.
    assert_eq!(read_keys_on_a_file(&mut a, &dir).status(), 0x02);
    assert_eq!(read_keys_on_a_file(&mut b, &dir).status(), 0x02);

    // Once one leaves, a newcomer is served again.
    drop(a);
    let served = wait_until(DEADLINE, || {
        let mut d = connect(&sock);
        read_up_to(&mut d, 4) == [0, 0, 0, 0]
    });
    assert!(served, "no connection served after one closed");
}

#[test]
fn frame_timeout_closes_a_stalled_request_and_keeps_idle_connections() {
    use std::io::{Read, Write};
    let dir = TempDir::new();
    let sock = dir.join("s.sock");
    let _p = serve(&sock, &["--frame-timeout", "1"]);
    // Idle between frames: kept.
    let (mut idle, _) = hello(&sock, 0);
    // Half a handshake, then nothing: closed after about a second. The
    // handshake's frame starts when the daemon accepts the connection, so
    // the clock starts before connecting: a test thread held up here
    // under load would otherwise see the close come "too early".
    let t = std::time::Instant::now();
    let mut stalled = connect(&sock);
    assert_eq!(read_up_to(&mut stalled, 4), vec![0, 0, 0, 0]);
    stalled.write_all(&[0, 0]).unwrap();
    stalled
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut b = [0u8; 1];
    assert_eq!(
        stalled.read(&mut b).unwrap(),
        0,
        "stalled client not closed"
    );
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(500),
        "closed too early"
    );
    // The idle one still works, well after the timeout.
    assert_eq!(read_keys_on_a_file(&mut idle, &dir).status(), 0x02);
    // And 0 means never.
    let sock0 = dir.join("s0.sock");
    let _p0 = serve(&sock0, &["--frame-timeout", "0"]);
    let mut s0 = connect(&sock0);
    assert_eq!(read_up_to(&mut s0, 4), vec![0, 0, 0, 0]);
    s0.write_all(&[0, 0]).unwrap();
    s0.set_read_timeout(Some(std::time::Duration::from_millis(1500)))
        .unwrap();
    let e = s0.read(&mut b).unwrap_err();
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{e}"
    );
}

#[test]
fn enable_cleanup_advertises_and_accepts_the_feature() {
    let dir = TempDir::new();
    let sock = dir.join("s.sock");
    let f = regular_file(&dir, "disk.img");
    let ro = std::fs::File::open(dir.join("disk.img")).unwrap();

    let mut p = serve(&sock, &["--enable-cleanup"]);
    let (mut c, features) = hello(&sock, 1);
    assert_eq!(features, [0, 0, 0, 1]);
    // CLEANUP (0xFF) on a non-multipath fd: GOOD, no data.
    send_frame(&c, &cdb(&[0xff]), &[f.as_fd()]);
    let out = read_reply(&mut c);
    assert_eq!((out.status(), out.data_len()), (0, 0));
    assert_eq!(out.sense(), &[0u8; 96][..]);
    // On a read-only fd: INVALID OPERATION CODE, as for PR OUT.
    send_frame(&c, &cdb(&[0xff]), &[ro.as_fd()]);
    assert_eq!(read_reply(&mut c).sense_code(), (0x05, 0x20, 0x00));
    // PR commands still work on the same connection.
    assert_eq!(read_keys_on_a_file(&mut c, &dir).status(), 0x02);
    // A client asking for nothing (released QEMU) is served as well.
    let (mut q, _) = hello(&sock, 0);
    assert_eq!(read_keys_on_a_file(&mut q, &dir).status(), 0x02);
    let (status, _) = p.stop();
    assert!(status.success());

    // Without the option: features 0, asking for bit 0 closes, and the
    // CLEANUP opcode is an invalid CDB.
    let _p = serve(&sock, &[]);
    let (mut c, features) = hello(&sock, 1);
    assert_eq!(features, [0, 0, 0, 0]);
    assert_eq!(read_reply(&mut c), Reply::Closed);
    let (mut c, _) = hello(&sock, 0);
    send_frame(&c, &cdb(&[0xff]), &[f.as_fd()]);
    assert_eq!(read_reply(&mut c), Reply::Closed);
}

// --------------------------------------------------------------- signals

fn stop_signal_exits_cleanly(sig: Signal) {
    let dir = TempDir::new();
    let sock = dir.join("s.sock");
    let mut p = serve(&sock, &[]);
    // An idle client (handshake done, no request) must not hold it up.
    let (mut idle, _) = hello(&sock, 0);
    let (mut used, _) = hello(&sock, 0);
    assert_eq!(read_keys_on_a_file(&mut used, &dir).status(), 0x02);
    let t0 = Instant::now();
    p.signal(sig);
    let status = p
        .wait_timeout(Duration::from_secs(3))
        .unwrap_or_else(|| panic!("{sig}: still running 3 s after the signal"));
    assert_eq!(status.code(), Some(0), "{sig}: {}", p.stderr());
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert!(!sock.exists(), "{sig}: socket not removed");
    assert_eq!(read_reply(&mut idle), Reply::Closed, "{sig}");
    assert_eq!(read_reply(&mut used), Reply::Closed, "{sig}");
}

/// A panic on the thread that runs the event loop (a bug; the daemon built
/// for these tests panics there at its first accept when
/// RESERVD_TEST_LOOP_PANIC is set) ends reservd: an error line, exit
/// status 1 (systemd's Restart=on-failure starts it again), the socket
/// removed; not a daemon that keeps its socket with no thread serving it.
#[test]
#[cfg_attr(
    not(debug_assertions),
    ignore = "the daemon's test hook exists in debug builds only"
)]
fn a_panic_in_the_event_loop_ends_the_daemon_with_an_error() {
    let dir = TempDir::new();
    let sock = dir.join("s.sock");
    let mut cmd = Command::new(RESERVD);
    cmd.args(["-k", sock.to_str().unwrap()])
        .env("RESERVD_TEST_LOOP_PANIC", "1");
    let mut p = Proc::spawn(cmd);
    p.wait_socket(&sock);
    let client = connect(&sock);
    let (status, _, stderr) = p.finish();
    assert_eq!(status.code(), Some(1), "{stderr}");
    let why = "a thread of the event loop panicked (a bug in reservd): RESERVD_TEST_LOOP_PANIC \
               is set: a test of a bug in the event loop";
    assert!(
        stderr
            .lines()
            .any(|l| l.contains(" ERROR reservd_daemon::server::crew] ")
                && l.ends_with(&format!("{why}; stopping"))),
        "{stderr}"
    );
    assert_eq!(
        stderr.lines().last(),
        Some(&*format!("reservd: event loop: {why}"))
    );
    assert!(!sock.exists(), "socket not removed");
    drop(client);
}

#[test]
fn sigterm_exits_cleanly() {
    stop_signal_exits_cleanly(Signal::SIGTERM);
}

#[test]
fn sigint_exits_cleanly() {
    stop_signal_exits_cleanly(Signal::SIGINT);
}

#[test]
fn sighup_exits_cleanly() {
    stop_signal_exits_cleanly(Signal::SIGHUP);
}

#[test]
fn sigpipe_is_ignored() {
    // A client that sends a request and leaves before the answer makes the
    // answer's write fail; that must not kill the daemon.
    let dir = TempDir::new();
    let sock = dir.join("s.sock");
    let mut p = serve(&sock, &[]);
    let f = regular_file(&dir, "disk.img");
    for _ in 0..20 {
        let (c, _) = hello(&sock, 0);
        send_frame(&c, &read_keys(0x2000), &[f.as_fd()]);
        drop(c);
    }
    let (mut c, _) = hello(&sock, 0);
    assert_eq!(read_keys_on_a_file(&mut c, &dir).status(), 0x02);
    assert!(p.try_status().is_none(), "daemon died: {}", p.stderr());
}

// ------------------------------------------------- systemd integration

#[test]
#[ignore = "needs systemd-socket-activate (package systemd); run by scripts/test.sh"]
fn socket_activation_serves_through_systemds_socket() {
    require(false, &["systemd-socket-activate"]);
    let dir = TempDir::new();
    let sock = dir.join("act.sock");
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.args(["-l", sock.to_str().unwrap(), RESERVD, "-v"]);
    let mut p = Proc::spawn(cmd);
    p.wait_socket(&sock);
    // The first connection makes systemd-socket-activate exec reservd,
    // which inherits the listening socket as fd 3.
    let (mut c, features) = hello(&sock, 0);
    assert_eq!(features, [0, 0, 0, 0]);
    let out = read_keys_on_a_file(&mut c, &dir);
    assert_eq!(out.sense_code(), (0x0b, 0x00, 0x06));
    assert!(
        p.wait_stderr("listening on the socket-activated fd"),
        "{}",
        p.stderr()
    );
    let (status, stderr) = p.stop();
    assert!(status.success(), "{stderr}");
    // The socket belongs to systemd: left in place.
    assert!(is_socket(&sock), "activated socket removed at exit");
}

#[test]
#[ignore = "needs systemd-socket-activate (package systemd); run by scripts/test.sh"]
fn socket_activation_with_k_is_an_error() {
    require(false, &["systemd-socket-activate"]);
    let dir = TempDir::new();
    let sock = dir.join("act.sock");
    let other = dir.join("other.sock");
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.args([
        "-l",
        sock.to_str().unwrap(),
        RESERVD,
        "-k",
        other.to_str().unwrap(),
    ]);
    let mut p = Proc::spawn(cmd);
    p.wait_socket(&sock);
    let mut c = connect(&sock);
    assert_eq!(read_up_to(&mut c, 4), Vec::<u8>::new());
    let (status, _, stderr) = p.finish();
    assert_eq!(status.code(), Some(1), "{stderr}");
    let lines = reservd_lines(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("socket activation"), "{}", lines[0]);
    assert!(!other.exists());
}

#[test]
#[ignore = "needs systemd-socket-activate (package systemd); run by scripts/test.sh"]
fn socket_activation_with_two_fds_is_an_error() {
    require(false, &["systemd-socket-activate"]);
    let dir = TempDir::new();
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.args([
        "-l",
        a.to_str().unwrap(),
        "-l",
        b.to_str().unwrap(),
        RESERVD,
    ]);
    let mut p = Proc::spawn(cmd);
    p.wait_socket(&a);
    p.wait_socket(&b);
    let mut c = connect(&a);
    assert_eq!(read_up_to(&mut c, 4), Vec::<u8>::new());
    let (status, _, stderr) = p.finish();
    assert_eq!(status.code(), Some(1), "{stderr}");
    let lines = reservd_lines(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("LISTEN_FDS > 1"), "{}", lines[0]);
}

#[test]
fn listen_fds_for_another_process_is_ignored() {
    // LISTEN_PID names someone else: not an activation, -k applies.
    let dir = TempDir::new();
    let sock = dir.join("s.sock");
    let mut cmd = Command::new(RESERVD);
    cmd.args(["-k", sock.to_str().unwrap()])
        .env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "1");
    let mut p = Proc::spawn(cmd);
    p.wait_socket(&sock);
    assert_eq!(hello(&sock, 0).1, [0, 0, 0, 0]);
    let (status, _) = p.stop();
    assert!(status.success());
}

/// The notifications received on `notify` until `quiet` passes with none
/// (or 50 of them).
fn notifications(notify: &UnixDatagram, quiet: Duration) -> Vec<String> {
    notify.set_read_timeout(Some(quiet)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while got.len() < 50 {
        let Ok(n) = notify.recv(&mut buf) else { break };
        got.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    got
}

#[test]
fn watchdog_keepalives_come_from_the_turning_loop() {
    let dir = TempDir::new();
    let sock = dir.join("s.sock");
    let notify_path = dir.join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let mut cmd = Command::new(RESERVD);
    cmd.args(["-k", sock.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "200000");
    let mut p = Proc::spawn(cmd);
    p.wait_socket(&sock);
    // Half the interval: about ten keep-alives in a second, READY=1 first.
    notify
        .set_read_timeout(Some(Duration::from_millis(250)))
        .unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while started.elapsed() < Duration::from_secs(1) {
        if let Ok(n) = notify.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
    }
    assert!(got[0].starts_with("READY=1\n"), "{got:?}");
    let pings = got.iter().filter(|m| m.as_str() == "WATCHDOG=1").count();
    assert!(pings >= 3, "{pings} keep-alives in a second: {got:?}");
    // A stopped daemon sends none (systemd then restarts it); they resume
    // once it runs again.
    p.signal(Signal::SIGSTOP);
    std::thread::sleep(Duration::from_millis(100));
    let _ = notifications(&notify, Duration::from_millis(10));
    let silent = notifications(&notify, Duration::from_millis(600));
    p.signal(Signal::SIGCONT);
    assert!(silent.is_empty(), "keep-alives while stopped: {silent:?}");
    notify.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = [0u8; 64];
    let n = notify
        .recv(&mut buf)
        .expect("a keep-alive once running again");
    assert_eq!(&buf[..n], b"WATCHDOG=1");
    let (status, _) = p.stop();
    assert!(status.success());
}

#[test]
fn no_watchdog_keepalives_for_another_process() {
    // WATCHDOG_PID names someone else (the process before a fork): the
    // watchdog is not reservd's.
    let dir = TempDir::new();
    let sock = dir.join("s.sock");
    let notify_path = dir.join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let mut cmd = Command::new(RESERVD);
    cmd.args(["-k", sock.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "200000")
        .env("WATCHDOG_PID", "1");
    let mut p = Proc::spawn(cmd);
    p.wait_socket(&sock);
    let got = notifications(&notify, Duration::from_millis(600));
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].starts_with("READY=1\n"), "{got:?}");
    let (status, _) = p.stop();
    assert!(status.success());
}

#[test]
fn readiness_is_notified_once_listening() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::SocketAddr;
    let dir = TempDir::new();
    let sock = dir.join("s.sock");
    // systemd's usual path socket, and an abstract one ("@name").
    let notify_path = dir.join("notify");
    let abstract_name = format!("reservd-test-notify-{}", std::process::id());
    let sockets = [
        (
            UnixDatagram::bind(&notify_path).unwrap(),
            notify_path.clone().into_os_string(),
        ),
        (
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&abstract_name).unwrap())
                .unwrap(),
            format!("@{abstract_name}").into(),
        ),
    ];
    for (notify, env) in sockets {
        notify.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut cmd = Command::new(RESERVD);
        cmd.args(["-k", sock.to_str().unwrap()])
            .env("NOTIFY_SOCKET", &env);
        let mut p = Proc::spawn(cmd);
        let mut buf = [0u8; 256];
        let n = notify
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("{env:?}: no notification: {e}; stderr {}", p.stderr()));
        let msg = String::from_utf8_lossy(&buf[..n]).to_string();
        let mut lines = msg.lines();
        assert_eq!(lines.next(), Some("READY=1"), "{env:?}: {msg:?}");
        // The status systemctl shows: serving, and where multipath stands.
        assert!(
            lines
                .next()
                .is_some_and(|l| l.starts_with("STATUS=serving; multipath support: ")),
            "{env:?}: {msg:?}"
        );
        // Ready means listening: the first connect must succeed, no retry.
        let mut s = UnixStream::connect(&sock).expect("connect right after READY=1");
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        assert_eq!(read_features(&mut s), [0, 0, 0, 0]);
        s.write_all(&[0; 4]).unwrap();
        let (status, _) = p.stop();
        assert!(status.success());
    }
}
