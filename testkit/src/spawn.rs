//! Shared by the tests of the built binary: temporary directories, child
//! processes that are always killed, bounded waits, connecting to a daemon
//! and its handshake. Raw protocol frames are in `frames`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long anything in these tests may take before it counts as hung.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Poll `cond` every 10 ms until it holds or `limit` has passed.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A directory under /tmp, removed with its contents on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let p = nix::unistd::mkdtemp("/tmp/reservd-test-XXXXXX").expect("mkdtemp");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether `path` is a UNIX socket.
pub fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}

/// A child process with its output collected in the background. Dropping
/// it kills the process (SIGKILL) and reaps it.
pub struct Proc {
    child: Child,
    status: Option<ExitStatus>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    name: String,
}

fn collect(mut r: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => into.lock().unwrap().extend_from_slice(&buf[..n]),
            }
        }
    })
}

impl Proc {
    /// Start `cmd` with stdin on /dev/null and stdout/stderr collected.
    pub fn spawn(mut cmd: Command) -> Proc {
        let name = format!("{cmd:?}");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(child.stdout.take().unwrap(), Arc::clone(&stdout)),
            collect(child.stderr.take().unwrap(), Arc::clone(&stderr)),
        ];
        Proc {
            child,
            status: None,
            stdout,
            stderr,
            readers,
            name,
        }
    }

    /// Start `program` (the daemon under test, normally) with `args`.
    pub fn start(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Proc {
        let mut cmd = Command::new(program);
        cmd.args(args);
        Proc::spawn(cmd)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The exit status, if the process has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    /// Wait up to `limit` for the process to exit.
    pub fn wait_timeout(&mut self, limit: Duration) -> Option<ExitStatus> {
        wait_until(limit, || self.try_status().is_some());
        self.try_status()
    }

    /// Wait for the exit (panicking after [`DEADLINE`]), then for all
    /// output. Returns (status, stdout, stderr).
    pub fn finish(&mut self) -> (ExitStatus, String, String) {
        let Some(status) = self.wait_timeout(DEADLINE) else {
            panic!(
                "{} did not exit; stderr so far: {}",
                self.name,
                self.stderr()
            );
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        (status, self.stdout(), self.stderr())
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("kill");
    }

    /// SIGTERM, then [`Proc::finish`]: (status, stderr).
    pub fn stop(&mut self) -> (ExitStatus, String) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let (status, _, stderr) = self.finish();
        (status, stderr)
    }

    /// Wait until `path` is a socket, panicking (with the process's stderr)
    /// if the process exits first or [`DEADLINE`] passes.
    pub fn wait_socket(&mut self, path: &Path) {
        let ok = wait_until(DEADLINE, || is_socket(path) || self.try_status().is_some());
        if !ok || !is_socket(path) {
            let status = self.try_status();
            panic!(
                "{} never created {} (status {status:?}); stderr: {}",
                self.name,
                path.display(),
                self.stderr()
            );
        }
    }

    /// Wait until the collected stderr contains `needle`.
    pub fn wait_stderr(&self, needle: &str) -> bool {
        wait_until(DEADLINE, || self.stderr().contains(needle))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Run `program` with `args` to completion (bounded) and return (status,
/// stdout, stderr).
pub fn run_to_end(
    program: impl AsRef<std::ffi::OsStr>,
    args: &[&str],
) -> (ExitStatus, String, String) {
    Proc::start(program, args).finish()
}

/// Whether process `pid` is gone (or a zombie nobody has reaped yet).
pub fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(true),
    }
}

/// Kills a process that is not our child (a daemon) on drop.
pub struct PidGuard(pub i32);

impl Drop for PidGuard {
    fn drop(&mut self) {
        if !process_gone(self.0) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// A `Key:\tvalue` line of /proc/PID/status.
pub fn proc_status(pid: i32, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// Connect to `path`, retrying while the listener is not up yet.
pub fn connect(path: &Path) -> UnixStream {
    let mut last = None;
    let ok = wait_until(DEADLINE, || match UnixStream::connect(path) {
        Ok(s) => {
            last = Some(Ok(s));
            true
        }
        Err(e) => {
            last = Some(Err(e));
            false
        }
    });
    match last {
        Some(Ok(s)) if ok => {
            s.set_read_timeout(Some(DEADLINE)).unwrap();
            s.set_write_timeout(Some(DEADLINE)).unwrap();
            s
        }
        other => panic!("cannot connect to {}: {other:?}", path.display()),
    }
}

/// Connect and complete the handshake with `requested` features.
/// Returns the stream and the server's feature bytes.
pub fn hello(path: &Path, requested: u32) -> (UnixStream, [u8; 4]) {
    let mut s = connect(path);
    let f = crate::frames::read_features(&mut s);
    s.write_all(&requested.to_be_bytes()).unwrap();
    (s, f)
}

/// A regular file opened read-write (SG_IO on it fails with ENOTTY).
pub fn regular_file(dir: &TempDir, name: &str) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join(name))
        .unwrap()
}

pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Whether `program` is on PATH.
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// Panic with a clear message when a test's prerequisites are missing,
/// so an ignored test run with --include-ignored fails loudly instead of
/// passing vacuously.
pub fn require(root: bool, programs: &[&str]) {
    if root {
        assert!(is_root(), "this test needs root");
    }
    for p in programs {
        assert!(have(p), "this test needs {p} on PATH");
    }
}

pub const QEMU: &str = "qemu-system-x86_64";

/// QEMU with one pr-manager-helper object on `sock` and QMP on `qmp`.
pub fn qemu(sock: &Path, qmp: &Path) -> Proc {
    let mut cmd = Command::new(QEMU);
    cmd.args(["-M", "none", "-nodefaults", "-display", "none", "-object"])
        .arg(format!("pr-manager-helper,id=pr0,path={}", sock.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    Proc::spawn(cmd)
}

/// A minimal QMP client: one JSON object per line.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connect, check the greeting and leave capabilities negotiation.
    pub fn connect(path: &Path) -> Qmp {
        let s = connect(path);
        let mut q = Qmp {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        };
        let greeting = q.line();
        assert!(
            greeting.starts_with(r#"{"QMP": {"version": "#),
            "{greeting}"
        );
        assert_eq!(q.execute("qmp_capabilities"), r#"{"return": {}}"#);
        q
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        let n = self.reader.read_line(&mut l).expect("QMP read");
        assert!(n > 0, "QMP connection closed");
        l.trim_end().to_string()
    }

    /// Run `command` and return its reply line, skipping events.
    pub fn execute(&mut self, command: &str) -> String {
        writeln!(self.writer, r#"{{"execute": "{command}"}}"#).unwrap();
        loop {
            let l = self.line();
            if l.starts_with(r#"{"return""#) || l.starts_with(r#"{"error""#) {
                return l;
            }
            assert!(l.starts_with(r#"{"timestamp""#), "unexpected QMP line {l}");
        }
    }
}
