//! The listening socket: bound by reservd (with the permissions asked for),
//! or passed by systemd socket activation.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// The socket reservd listens on unless -k names one: qemu-pr-helper's.
pub const DEFAULT_SOCKET: &str = "/var/run/qemu-pr-helper.sock";
/// Permissions of the socket reservd creates, unless --socket-mode says.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

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
    bind(
        path.unwrap_or(default),
        perms.mode.unwrap_or(default_mode),
        perms.group,
    )
}

/// A new socket at `path` (absolute), with `mode` and `group`: the main
/// socket when not socket-activated, and the metrics socket.
pub fn bind(path: &Path, mode: u32, group: Option<nix::unistd::Gid>) -> anyhow::Result<Listener> {
    if !path.is_absolute() {
        bail!("socket path must be absolute: {}", path.display());
    }
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_dir()) {
        bail!("cannot listen on {}: is a directory", path.display())
    }
    let listener = bind_in_place(path, mode, group)?;
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
