//! Start-up plumbing: the listening socket (bound or from systemd socket
//! activation), the pid file, daemonizing and readiness notification.
#![allow(unsafe_code)]

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// The listening socket and whether reservd created its file.
pub struct Listener {
    pub listener: UnixListener,
    /// Set when reservd bound the path itself: (path, dev, ino) to unlink
    /// at exit if the file is still the one it created.
    pub created: Option<(PathBuf, u64, u64)>,
    pub activated: bool,
}

/// The fd passed by systemd socket activation, if this process is its
/// target. Unsets LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES.
pub fn activation_fd() -> anyhow::Result<Option<OwnedFd>> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(None);
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    let Ok(n) = fds.trim().parse::<u32>() else {
        return Ok(None);
    };
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    if n == 0 {
        return Ok(None);
    }
    if n > 1 {
        bail!("socket activation with LISTEN_FDS > 1 is not supported (got {n})");
    }
    let fd = 3;
    // SAFETY: fcntl(F_GETFD) only inspects the descriptor number.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        bail!(
            "socket activation failed: invalid file descriptor fd = {fd}: {}",
            io::Error::last_os_error()
        );
    }
    // SAFETY: systemd passed fd 3 to this process (LISTEN_PID matched and
    // the descriptor is open); nothing else in reservd refers to it, so the
    // OwnedFd becomes its only owner.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    nix::fcntl::fcntl(
        &owned,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .context("socket activation failed: FD_CLOEXEC on fd 3")?;
    Ok(Some(owned))
}

/// Permissions and group of a socket reservd creates.
#[derive(Clone, Copy, Debug, Default)]
pub struct SocketPerms {
    /// `--socket-mode`; None for the default.
    pub mode: Option<u32>,
    /// `--socket-group`.
    pub group: Option<nix::unistd::Gid>,
}

/// Open the listening socket: systemd's, or a new one at `path` with
/// `perms` (the mode defaulting to `default_mode`).
pub fn listen(
    path: Option<&Path>,
    default: &Path,
    perms: SocketPerms,
    default_mode: u32,
) -> anyhow::Result<Listener> {
    if let Some(fd) = activation_fd()? {
        if path.is_some() {
            bail!("the socket path can't be set (-k) when using socket activation");
        }
        // systemd created the socket: its unit's SocketMode= and
        // SocketGroup= say who may connect, and reservd does not
        // silently second-guess them.
        if perms.mode.is_some() || perms.group.is_some() {
            bail!(
                "--socket-mode and --socket-group can't be used with socket activation \
                 (set SocketMode= and SocketGroup= in the socket unit)"
            );
        }
        check_listening_unix_socket(&fd)?;
        return Ok(Listener {
            listener: UnixListener::from(fd),
            created: None,
            activated: true,
        });
    }
    let path = path.unwrap_or(default);
    if !path.is_absolute() {
        bail!("socket path must be absolute: {}", path.display());
    }
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_dir()) {
        bail!("cannot listen on {}: is a directory", path.display())
    }
    let mode = perms.mode.unwrap_or(default_mode);
    let listener = bind_in_place(path, mode, perms.group)?;
    let meta = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    Ok(Listener {
        listener,
        created: Some((path.to_path_buf(), meta.dev(), meta.ino())),
        activated: false,
    })
}

/// Bind and listen under a temporary name beside `path`, then rename it
/// into place (replacing an old socket), so the path never names a socket
/// that is not yet listening: libvirt starts QEMU as soon as the path
/// exists, and QEMU's connect would be refused in that window.
///
/// The socket gets `mode` and `group` before it is renamed into place, so
/// the path never names it with other permissions.
fn bind_in_place(
    path: &Path,
    mode: u32,
    group: Option<nix::unistd::Gid>,
) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let bind = |p: &Path| {
        let l = UnixListener::bind(p)
            .with_context(|| format!("cannot listen on {}", path.display()))?;
        let set = || -> anyhow::Result<()> {
            if let Some(g) = group {
                nix::unistd::chown(p, None, Some(g)).with_context(|| {
                    format!("cannot set the group of {} to {g}", path.display())
                })?;
            }
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("cannot set the mode of {}", path.display()))?;
            Ok(())
        };
        if let Err(e) = set() {
            let _ = std::fs::remove_file(p);
            return Err(e);
        }
        Ok(l)
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    // sun_path holds 107 bytes: a name too long for the suffix binds in place.
    if tmp.as_os_str().len() > 107 {
        let _ = std::fs::remove_file(path);
        return bind(path);
    }
    let _ = std::fs::remove_file(&tmp);
    let listener = bind(&tmp)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot listen on {}", path.display()));
    }
    Ok(listener)
}

fn check_listening_unix_socket(fd: &OwnedFd) -> anyhow::Result<()> {
    use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, SockaddrStorage};
    let ty =
        getsockopt(fd, sockopt::SockType).context("socket activation: fd 3 is not a socket")?;
    let addr: SockaddrStorage =
        getsockname(fd.as_raw_fd()).context("socket activation: getsockname")?;
    if ty != SockType::Stream || addr.as_unix_addr().is_none() {
        bail!("socket activation: fd 3 is not a UNIX stream socket");
    }
    if !getsockopt(fd, sockopt::AcceptConn).unwrap_or(false) {
        bail!("socket activation: fd 3 is not listening");
    }
    Ok(())
}

impl Listener {
    /// Remove the socket file if reservd created it and it is still there.
    pub fn remove(&self) {
        let Some((path, dev, ino)) = &self.created else {
            return;
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.dev() == *dev && m.ino() == *ino => {
                if let Err(e) = std::fs::remove_file(path) {
                    log::warn!("failed to unlink socket {}: {e}", path.display());
                }
            }
            _ => {}
        }
    }
}

/// A locked pid file, held for the life of the process.
pub struct PidFile {
    _file: File,
}

fn whole_file_lock(l_type: libc::c_int) -> libc::flock {
    libc::flock {
        l_type: l_type as _,
        l_whence: libc::SEEK_SET as _,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    }
}

/// The pid of the process holding a lock on `file`, if any.
fn lock_holder(file: &File) -> Option<libc::pid_t> {
    use nix::fcntl::{fcntl, FcntlArg};
    let mut lock = whole_file_lock(libc::F_WRLCK);
    fcntl(file, FcntlArg::F_GETLK(&mut lock)).ok()?;
    (lock.l_type != libc::F_UNLCK as _).then_some(lock.l_pid)
}

fn locked_error(path: &Path, holder: Option<libc::pid_t>) -> anyhow::Error {
    match holder {
        Some(pid) => anyhow::anyhow!(
            "cannot lock pid file {}: held by process {pid}",
            path.display()
        ),
        None => anyhow::anyhow!(
            "cannot lock pid file {}: held by another process",
            path.display()
        ),
    }
}

/// Fail if another process holds the lock on the pid file at `path`.
///
/// Run before the socket is bound, so that a second instance started by
/// mistake stops before it replaces the running instance's socket. A
/// missing or unreadable file is left for [`write_pidfile`] to report.
///
/// F_GETLK ignores locks this process holds, so a pid file that the
/// launcher locked before exec'ing reservd (older libvirt) passes; closing
/// the probe drops such a lock, and [`write_pidfile`] takes it again at
/// once.
pub fn check_pidfile_free(path: &Path) -> anyhow::Result<()> {
    let Ok(file) = File::open(path) else {
        return Ok(());
    };
    match lock_holder(&file) {
        Some(pid) => Err(locked_error(path, Some(pid))),
        None => Ok(()),
    }
}

/// Create, lock and write the pid file, as QEMU does: mode 0600, an
/// exclusive fcntl lock, an inode re-check against a racing unlink, then
/// "<pid>\n". The file stays at exit.
pub fn write_pidfile(path: &Path) -> anyhow::Result<PidFile> {
    use nix::fcntl::{fcntl, FcntlArg};
    for _ in 0..10 {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot open pid file {}", path.display()))?;
        let lock = whole_file_lock(libc::F_WRLCK);
        if fcntl(&file, FcntlArg::F_SETLK(&lock)).is_err() {
            return Err(locked_error(path, lock_holder(&file)));
        }
        let held = file.metadata()?;
        match std::fs::metadata(path) {
            Ok(m) if m.dev() == held.dev() && m.ino() == held.ino() => {}
            _ => continue,
        }
        file.set_len(0)?;
        (&file)
            .write_all(format!("{}\n", std::process::id()).as_bytes())
            .with_context(|| format!("writing pid file {}", path.display()))?;
        return Ok(PidFile { _file: file });
    }
    bail!(
        "cannot lock pid file {}: it keeps being replaced",
        path.display()
    )
}

/// The daemon's end of the start-up report to the process that ran it.
pub struct Detached {
    pipe: File,
}

/// What the daemon writes on success; anything else is an error message.
const STARTED: &[u8] = b"OK";

impl Detached {
    /// Start-up is complete: the parent exits 0.
    pub fn ready(mut self) {
        let _ = self.pipe.write_all(STARTED);
    }

    /// Start-up failed: the parent prints `message` and exits 1.
    pub fn failed(mut self, message: &str) {
        let text = if message.as_bytes() == STARTED {
            "start-up failed"
        } else {
            message
        };
        let _ = self.pipe.write_all(text.as_bytes());
    }
}

/// Detach like daemon(3): fork, new session, cwd /, standard streams on
/// /dev/null. Must run before any thread starts.
///
/// Unlike daemon(3), the parent does not exit at once: it waits until the
/// daemon reports through a pipe that start-up is complete ([`Detached`]),
/// then exits 0, or prints the daemon's error and exits 1. A caller that
/// waits for the parent (an init script, libvirt) thus finds the socket
/// ready, and sees start-up errors that happen after the fork.
pub fn daemonize() -> anyhow::Result<Detached> {
    use std::io::Read;
    let (rx, tx) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("failed to daemonize: pipe")?;
    // SAFETY: reservd is single-threaded at this point (no workers yet), so
    // the child may run arbitrary code after fork.
    match unsafe { nix::unistd::fork() }.context("failed to daemonize")? {
        nix::unistd::ForkResult::Parent { .. } => {
            drop(tx);
            // The stop signals were blocked for the daemon's signal fd; the
            // waiting parent should still die of them.
            let _ = nix::sys::signal::SigSet::all().thread_unblock();
            let mut report = Vec::new();
            let _ = File::from(rx).read_to_end(&mut report);
            if report == STARTED {
                std::process::exit(0);
            }
            if report.is_empty() {
                eprintln!("reservd: the daemon exited during start-up");
            } else {
                eprintln!("reservd: {}", String::from_utf8_lossy(&report));
            }
            std::process::exit(1);
        }
        nix::unistd::ForkResult::Child => drop(rx),
    }
    let detached = Detached {
        pipe: File::from(tx),
    };
    match detach_child() {
        Ok(()) => Ok(detached),
        Err(e) => {
            detached.failed(&format!("{e:#}"));
            Err(e)
        }
    }
}

/// The daemon(3) steps after the fork, in the child.
fn detach_child() -> anyhow::Result<()> {
    nix::unistd::setsid().context("failed to daemonize: setsid")?;
    std::env::set_current_dir("/").context("failed to daemonize: chdir /")?;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .context("failed to daemonize: opening /dev/null")?;
    nix::unistd::dup2_stdin(&null).context("failed to daemonize: dup2")?;
    nix::unistd::dup2_stdout(&null).context("failed to daemonize: dup2")?;
    nix::unistd::dup2_stderr(&null).context("failed to daemonize: dup2")?;
    Ok(())
}

/// Tell systemd the service is ready, when started as Type=notify, with
/// a status line for `systemctl status`.
pub fn notify_ready(status: &str) {
    notify(&format!("READY=1\nSTATUS={status}"));
}

/// How often the event loop sends systemd's watchdog keep-alive: half of
/// `WATCHDOG_USEC`, if systemd set it for this process (`WATCHDOG_PID`
/// unset or this process's pid), as sd_watchdog_enabled(3) reads them.
pub fn watchdog_interval() -> Option<std::time::Duration> {
    watchdog_interval_of(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn watchdog_interval_of(
    usec: Option<&str>,
    pid: Option<&str>,
    me: u32,
) -> Option<std::time::Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if pid.is_some_and(|p| p.trim().parse::<u32>().ok() != Some(me)) {
        return None;
    }
    Some(std::time::Duration::from_micros(usec) / 2)
}

/// Send `message` (newline-separated `KEY=value` assignments) to systemd's
/// notification socket, if there is one.
pub fn notify(message: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let bytes = path.as_encoded_bytes();
    let r = if let Some(abs) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abs)
            .and_then(|a| sock.send_to_addr(message.as_bytes(), &a))
    } else {
        sock.send_to(message.as_bytes(), Path::new(&path))
    };
    if let Err(e) = r {
        log::warn!("cannot notify systemd: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::watchdog_interval_of;
    use std::time::Duration;

    #[test]
    fn watchdog_interval_is_half_of_systemds_for_this_process_only() {
        assert_eq!(
            watchdog_interval_of(Some("3000000"), None, 42),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            watchdog_interval_of(Some("3000000"), Some("42"), 42),
            Some(Duration::from_millis(1500))
        );
        // Meant for another process (the one before a fork), absent, zero or garbage.
        assert_eq!(watchdog_interval_of(Some("3000000"), Some("41"), 42), None);
        assert_eq!(watchdog_interval_of(None, Some("42"), 42), None);
        assert_eq!(watchdog_interval_of(Some("0"), None, 42), None);
        assert_eq!(watchdog_interval_of(Some("3s"), None, 42), None);
        assert_eq!(watchdog_interval_of(Some("3000000"), Some("x"), 42), None);
    }
}
