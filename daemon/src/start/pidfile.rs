//! The pid file: written once start-up is past the socket, locked for the
//! life of the process; a pid file locked by a running instance stops
//! start-up before the socket is touched.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use anyhow::{bail, Context};

/// The pid file of -d without -f: qemu-pr-helper's.
pub const DEFAULT_PIDFILE: &str = "/var/run/qemu-pr-helper.pid";

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
    (lock.l_type != libc::F_UNLCK as libc::c_short).then_some(lock.l_pid)
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
/// `"<pid>\n"`. The file stays at exit.
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
