//! Child processes: the one way the tests, the VM tier's guest scenarios
//! and the benchmark start a daemon (reservd, qemu-pr-helper, either under
//! systemd-socket-activate) or any other program, wait for it to serve its
//! socket, and stop it. A child is always reaped: dropping a [`Proc`]
//! kills it, dropping a [`Daemon`] stops it with SIGTERM first.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use reservd_client::client::Client;

/// How long anything in these tests may take before it counts as hung.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// How long a daemon has to exit after SIGTERM before it is killed.
pub const STOP_LIMIT: Duration = Duration::from_secs(20);

/// Poll `cond` every 10 ms until it holds or `limit` has passed.
pub fn wait_until(limit: Duration, cond: impl FnMut() -> bool) -> bool {
    poll_until(limit, Duration::from_millis(10), cond)
}

/// Poll `cond` every `every` until it holds or `limit` has passed.
fn poll_until(limit: Duration, every: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(every);
    }
}

/// Poll `check` every 100 ms (for checks that run a command or read
/// /proc, such as the VM tier's) until it says yes: an error naming `what`
/// once `limit` has passed, or the first error of `check`.
pub fn wait_for(
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<bool, String>,
) -> Result<(), String> {
    let mut failed = None;
    let yes = poll_until(limit, Duration::from_millis(100), || match check() {
        Ok(yes) => yes,
        Err(e) => {
            failed = Some(e);
            true
        }
    });
    match failed {
        Some(e) => Err(e),
        None if yes => Ok(()),
        None => Err(format!("after {} s: {what}", limit.as_secs_f64())),
    }
}

/// Whether `path` is a UNIX socket.
pub fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}

/// Where a child's standard output and error go (its stdin is /dev/null).
pub enum Output {
    /// Collected in memory: [`Proc::stdout`], [`Proc::stderr`].
    Collect,
    /// stderr to this file (created, or truncated), stdout to /dev/null.
    Log(PathBuf),
    /// Both to /dev/null.
    Discard,
}

/// What it takes for a daemon to count as started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ready {
    /// Its socket exists (waited for with [`wait_until`]'s 10 ms polls).
    Socket,
    /// It sends its 4 feature bytes to a new connection, polled every
    /// 100 µs: start-up times are measured by it.
    Hello,
}

/// A child process, reaped on drop (killed first if still running).
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
    /// Start `cmd` with its output as `output` said.
    pub fn spawn_with(mut cmd: Command, output: Output) -> Result<Proc, String> {
        let name = format!("{cmd:?}");
        cmd.stdin(Stdio::null());
        match &output {
            Output::Collect => {
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            }
            Output::Log(path) => {
                let log =
                    File::create(path).map_err(|e| format!("creating {}: {e}", path.display()))?;
                cmd.stdout(Stdio::null()).stderr(log);
            }
            Output::Discard => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        if let Output::Collect = output {
            readers.push(collect(child.stdout.take().unwrap(), Arc::clone(&stdout)));
            readers.push(collect(child.stderr.take().unwrap(), Arc::clone(&stderr)));
        }
        Ok(Proc {
            child,
            status: None,
            stdout,
            stderr,
            readers,
            name,
        })
    }

    /// Start `cmd` with stdin on /dev/null and stdout/stderr collected.
    pub fn spawn(cmd: Command) -> Proc {
        Proc::spawn_with(cmd, Output::Collect).unwrap_or_else(|e| panic!("{e}"))
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

    /// The output collected so far ([`Output::Collect`]).
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    /// The error output collected so far ([`Output::Collect`]).
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    pub fn signal(&self, sig: Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("kill");
    }

    /// SIGTERM, then [`Proc::finish`]: (status, stderr).
    pub fn stop(&mut self) -> (ExitStatus, String) {
        self.signal(Signal::SIGTERM);
        let (status, _, stderr) = self.finish();
        (status, stderr)
    }

    /// SIGTERM, and up to `limit` for the process to exit; then SIGKILL.
    /// The exit status.
    pub fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        if self.try_status().is_none() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), Signal::SIGTERM);
        }
        if let Some(s) = self.wait_timeout(limit) {
            return Some(s);
        }
        let _ = self.child.kill();
        self.status = self.child.wait().ok();
        self.status
    }

    /// Wait until the process is ready on `path` as `ready` says, up to
    /// `limit`; an error if it exits first or the time runs out.
    pub fn wait_ready(&mut self, path: &Path, ready: Ready, limit: Duration) -> Result<(), String> {
        let up = || match ready {
            Ready::Socket => is_socket(path),
            Ready::Hello => UnixStream::connect(path)
                .and_then(|mut s| s.read_exact(&mut [0u8; 4]))
                .is_ok(),
        };
        let every = match ready {
            Ready::Socket => Duration::from_millis(10),
            Ready::Hello => Duration::from_micros(100),
        };
        let mut exited = None;
        let ok = poll_until(limit, every, || {
            exited = self.try_status();
            up() || exited.is_some()
        });
        if ok && exited.is_none() {
            return Ok(());
        }
        // It may have served, then exited, between the two checks.
        if up() {
            return Ok(());
        }
        let what = match ready {
            Ready::Socket => "created",
            Ready::Hello => "served",
        };
        Err(match exited {
            Some(s) => format!(
                "{} exited ({s}) and never {what} {}; stderr: {}",
                self.name,
                path.display(),
                self.stderr()
            ),
            None => format!(
                "{} never {what} {} in {} s; stderr: {}",
                self.name,
                path.display(),
                limit.as_secs_f64(),
                self.stderr()
            ),
        })
    }

    /// Wait until `path` is a socket, panicking (with the process's stderr)
    /// if the process exits first or [`DEADLINE`] passes.
    pub fn wait_socket(&mut self, path: &Path) {
        if let Err(e) = self.wait_ready(path, Ready::Socket, DEADLINE) {
            panic!("{e}");
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

/// A daemon serving a UNIX socket, its stderr in a log file: started by
/// [`Daemon::start`], which returns once it is ready; stopped (SIGTERM,
/// then SIGKILL after [`STOP_LIMIT`]) by [`Daemon::stop`] or on drop.
pub struct Daemon {
    proc: Proc,
    pub socket: PathBuf,
    pub log: PathBuf,
    /// When it was spawned.
    pub spawned: Instant,
}

impl Daemon {
    /// Start `cmd`, which serves `socket` (a stale socket file there is
    /// removed first), with its stderr in `log`; wait up to [`DEADLINE`]
    /// (30 s for [`Ready::Hello`]) until it is `ready`.
    pub fn start(cmd: Command, socket: &Path, log: &Path, ready: Ready) -> Result<Daemon, String> {
        let _ = std::fs::remove_file(socket);
        let spawned = Instant::now();
        let mut proc = Proc::spawn_with(cmd, Output::Log(log.to_path_buf()))?;
        let limit = match ready {
            Ready::Socket => DEADLINE,
            Ready::Hello => Duration::from_secs(30),
        };
        proc.wait_ready(socket, ready, limit).map_err(|e| {
            format!(
                "{e}; log: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        })?;
        Ok(Daemon {
            proc,
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
            spawned,
        })
    }

    /// reservd (or qemu-pr-helper, which takes the same `-k`) at `bin`, as
    /// libvirt starts it: `bin -k SOCKET EXTRA...`.
    pub fn helper(bin: &Path, socket: &Path, log: &Path, extra: &[&str]) -> Result<Daemon, String> {
        let mut cmd = Command::new(bin);
        cmd.arg("-k").arg(socket).args(extra);
        Daemon::start(cmd, socket, log, Ready::Socket)
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid() as u32
    }

    /// A client of the daemon, after its handshake (no features).
    pub fn client(&self) -> Result<Client, String> {
        Client::connect(&self.socket)
            .map_err(|e| format!("connecting to {}: {e}", self.socket.display()))
    }

    /// reservd loads libmpathpersist in the background once serving; the
    /// thread doing it ("reservd-mpath") is started before the first
    /// command is answered. After one answer, wait for that thread to be
    /// gone, so that tests counting fds see the daemon settled.
    pub fn wait_multipath_loaded(&self) -> Result<(), String> {
        let tasks = format!("/proc/{}/task", self.pid());
        let mut listing = Ok(());
        let gone = wait_until(DEADLINE, || match std::fs::read_dir(&tasks) {
            Err(e) => {
                listing = Err(format!("{tasks}: {e}"));
                true
            }
            Ok(rd) => !rd.filter_map(|t| t.ok()).any(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "reservd-mpath")
            }),
        });
        listing?;
        if gone {
            Ok(())
        } else {
            Err("libmpathpersist still loading after 10 s".into())
        }
    }

    /// SIGTERM, and the exit status (SIGKILL after [`STOP_LIMIT`]); `None`
    /// if it had been stopped already.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if self.proc.status.is_some() {
            return None;
        }
        self.proc.terminate(STOP_LIMIT)
    }

    /// The process, for signals and its status.
    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
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
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0), Signal::SIGKILL);
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
